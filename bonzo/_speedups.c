/* Optional accelerator for the DATA scan of bonzo.protocol.
 *
 * bonzo.protocol._scan_data_py is the reference implementation and the
 * fallback when this module is not built; both return the same result for
 * every input (tests/test_speedups.py checks that). In pure Python the scan
 * costs several passes over the content (three counts for bare CR/LF, a
 * search for the final dot, one for long lines); here it is one pass of
 * memchr calls, line by line.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define SCAN_DOTS 1 /* a line at a line start begins with a dot (to unstuff) */
#define SCAN_BARE 2 /* a CR not followed by LF, or an LF not preceded by CR */
#define SCAN_LONG 4 /* a line longer than max_line octets, LF included */

PyDoc_STRVAR(scan_data_doc,
"scan_data(buf, start, line_start, max_line) -> (end, cut, flags)\n\n"
"Scan message content in buf from start, line by line.");

static PyObject *
scan_data(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, max_line;
    int line_start;

    if (!PyArg_ParseTuple(args, "y*npn:scan_data", &view, &start, &line_start, &max_line)) {
        return NULL;
    }
    const char *buf = (const char *)view.buf;
    Py_ssize_t len = view.len;
    if (start < 0 || start > len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start is out of range");
        return NULL;
    }
    Py_ssize_t s = start, end = -1, cut = start;
    int flags = 0;
    while (s < len) {
        const char *lf = memchr(buf + s, '\n', (size_t)(len - s));
        if (lf == NULL) {
            break; /* an incomplete line stays in the buffer */
        }
        Py_ssize_t nl = lf - buf;
        if (line_start && buf[s] == '.') {
            if (nl == s + 2 && buf[s + 1] == '\r') {
                end = s; /* ".\r\n" at a line start: the end of the data */
                break;
            }
            flags |= SCAN_DOTS;
        }
        if (nl - s + 1 > max_line) {
            flags |= SCAN_LONG;
        }
        /* In a well-formed line the first CR is the one just before the LF. */
        const char *cr = memchr(buf + s, '\r', (size_t)(nl - s));
        if (cr == NULL || cr != lf - 1) {
            flags |= SCAN_BARE;
        }
        /* Only a line that ends in CRLF makes the next one a line start. */
        line_start = nl > s && buf[nl - 1] == '\r';
        s = cut = nl + 1;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nni", end, end >= 0 ? end : cut, flags);
}

static PyMethodDef speedups_methods[] = {
    {"scan_data", scan_data, METH_VARARGS, scan_data_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "bonzo._speedups",
    "C accelerator for the protocol core's DATA scan (optional).",
    -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}
