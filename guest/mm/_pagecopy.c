/*
 * gemu.guest.mm._pagecopy: the byte copy of a scattered batch of pages, in C.
 *
 * copy_pages(dst, dst_pages, src, src_pages, shift, /) copies page src_pages[i] of the
 * buffer src to page dst_pages[i] of the buffer dst for every i, in order; a page is
 * 1 << shift bytes and page n starts at byte n << shift. It is the copy a fragmented GEM
 * object's swap-out and swap-in make (gemu.guest.mm.extents.copy_page_views does the same
 * in Python, and is what runs where this module is not built).
 *
 * Only the bytes move here. Which pages may be copied (frames in use, slots in use, none
 * twice) is checked by the Python model before it calls this; this function checks only
 * what keeps the copy inside the two buffers, and checks all of it before it copies
 * anything: a bad batch raises and leaves both buffers as they were.
 *
 * Errors: TypeError (not a buffer, a page that is not an int, not sequences),
 * BufferError (dst read-only or either buffer not contiguous), ValueError (the two lists
 * differ in length, shift outside 0..30), IndexError (a page negative or past the last
 * whole page, naming its position).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Check every page number of seq (a PySequence_Fast result) against limit pages. */
static int
check_pages(PyObject *seq, Py_ssize_t n, Py_ssize_t limit, const char *which)
{
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyLong_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "copy_pages: %s[%zd] is %.100s, not an int",
                         which, i, Py_TYPE(items[i])->tp_name);
            return -1;
        }
        Py_ssize_t page = PyLong_AsSsize_t(items[i]);
        if (page == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
            PyErr_Format(PyExc_IndexError, "copy_pages: %s[%zd] = %R outside the buffer's "
                         "%zd pages", which, i, items[i], limit);
            return -1;
        }
        if (page < 0 || page >= limit) {
            PyErr_Format(PyExc_IndexError,
                         "copy_pages: %s[%zd] = %zd outside the buffer's %zd pages",
                         which, i, page, limit);
            return -1;
        }
    }
    return 0;
}

static PyObject *
copy_pages(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError,
                     "copy_pages() takes 5 arguments (dst, dst_pages, src, src_pages, shift), "
                     "%zd given", nargs);
        return NULL;
    }
    long shift = PyLong_AsLong(args[4]);
    if (shift == -1 && PyErr_Occurred())
        return NULL;
    if (shift < 0 || shift > 30) {
        PyErr_Format(PyExc_ValueError, "copy_pages: shift %ld outside 0..30", shift);
        return NULL;
    }
    PyObject *dseq = PySequence_Fast(args[1], "copy_pages: dst_pages must be a sequence");
    if (dseq == NULL)
        return NULL;
    PyObject *sseq = PySequence_Fast(args[3], "copy_pages: src_pages must be a sequence");
    if (sseq == NULL) {
        Py_DECREF(dseq);
        return NULL;
    }
    PyObject *result = NULL;
    Py_buffer dst = {0}, src = {0};
    int have_dst = 0, have_src = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(dseq);
    if (PySequence_Fast_GET_SIZE(sseq) != n) {
        PyErr_Format(PyExc_ValueError, "copy_pages: %zd destination pages for %zd source pages",
                     n, PySequence_Fast_GET_SIZE(sseq));
        goto out;
    }
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE) < 0)
        goto out;
    have_dst = 1;
    if (PyObject_GetBuffer(args[2], &src, PyBUF_SIMPLE) < 0)
        goto out;
    have_src = 1;
    if (check_pages(dseq, n, dst.len >> shift, "dst_pages") < 0 ||
        check_pages(sseq, n, src.len >> shift, "src_pages") < 0)
        goto out;

    /* Every page is in range: copy. memmove, as dst and src may be one buffer. */
    {
        PyObject **d = PySequence_Fast_ITEMS(dseq);
        PyObject **s = PySequence_Fast_ITEMS(sseq);
        char *dbuf = dst.buf;
        const char *sbuf = src.buf;
        size_t size = (size_t)1 << shift;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t dp = PyLong_AsSsize_t(d[i]);
            Py_ssize_t sp = PyLong_AsSsize_t(s[i]);
            memmove(dbuf + ((size_t)dp << shift), sbuf + ((size_t)sp << shift), size);
        }
    }
    result = Py_NewRef(Py_None);
out:
    if (have_src)
        PyBuffer_Release(&src);
    if (have_dst)
        PyBuffer_Release(&dst);
    Py_DECREF(sseq);
    Py_DECREF(dseq);
    return result;
}

static PyMethodDef pagecopy_methods[] = {
    {"copy_pages", (PyCFunction)(void (*)(void))copy_pages, METH_FASTCALL,
     "copy_pages(dst, dst_pages, src, src_pages, shift, /)\n--\n\n"
     "Copy page src_pages[i] of src to page dst_pages[i] of dst for every i, in order\n"
     "(pages of 1 << shift bytes); every page number is checked before anything is copied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pagecopy_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gemu.guest.mm._pagecopy",
    .m_doc = "The byte copy of a scattered batch of pages (swap-out and swap-in of a "
             "fragmented object), in C.",
    .m_size = 0,
    .m_methods = pagecopy_methods,
};

PyMODINIT_FUNC
PyInit__pagecopy(void)
{
    return PyModuleDef_Init(&pagecopy_module);
}
