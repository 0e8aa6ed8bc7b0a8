/* Optional accelerators: the DATA scan of bonzo.protocol, and the batches
 * of bonzo.durable (commit, remove, create).
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
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* commit_files: bonzo.durable.commit_files is the reference (and fallback);
 * tests/test_durable.py runs both. Here the whole batch of system calls runs
 * with the GIL released once, so the event loop's thread never has to hand
 * the GIL over to the committing thread between two of them. */

PyDoc_STRVAR(commit_files_doc,
"commit_files(fds, tmps, finals, dirs) -> (errors, dir_errors)\n\n"
"fsync each fd; rename each tmp to its final name; fsync each directory.");

static int
bytes_items(PyObject *seq, Py_ssize_t n, const char **out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "paths must be bytes");
            return -1;
        }
        out[i] = PyBytes_AS_STRING(item);
        if ((size_t)PyBytes_GET_SIZE(item) != strlen(out[i])) {
            PyErr_SetString(PyExc_ValueError, "embedded null byte in a path");
            return -1;
        }
    }
    return 0;
}

static int
fd_items(PyObject *seq, Py_ssize_t n, int *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (v < 0 || v > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "a file descriptor is out of range");
            return -1;
        }
        out[i] = (int)v;
    }
    return 0;
}

static PyObject *
int_list(const int *values, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(values[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static PyObject *
commit_files(PyObject *self, PyObject *args)
{
    PyObject *fds_in, *tmps_in, *finals_in, *dirs_in;
    PyObject *fds = NULL, *tmps = NULL, *finals = NULL, *dirs = NULL, *result = NULL;
    int *fd = NULL, *err = NULL, *dir_err = NULL;
    const char **tmp = NULL, **final = NULL, **dir = NULL;

    if (!PyArg_ParseTuple(args, "OOOO:commit_files", &fds_in, &tmps_in, &finals_in, &dirs_in)) {
        return NULL;
    }
    fds = PySequence_Fast(fds_in, "fds must be a sequence");
    tmps = PySequence_Fast(tmps_in, "tmps must be a sequence");
    finals = PySequence_Fast(finals_in, "finals must be a sequence");
    dirs = PySequence_Fast(dirs_in, "dirs must be a sequence");
    if (fds == NULL || tmps == NULL || finals == NULL || dirs == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fds);
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(dirs);
    if (PySequence_Fast_GET_SIZE(tmps) != n || PySequence_Fast_GET_SIZE(finals) != n) {
        PyErr_SetString(PyExc_ValueError, "fds, tmps and finals differ in length");
        goto done;
    }
    /* +1: a zero-length malloc may return NULL */
    fd = calloc((size_t)n + 1, sizeof(int));
    err = calloc((size_t)n + 1, sizeof(int));
    dir_err = calloc((size_t)nd + 1, sizeof(int));
    tmp = calloc((size_t)n + 1, sizeof(char *));
    final = calloc((size_t)n + 1, sizeof(char *));
    dir = calloc((size_t)nd + 1, sizeof(char *));
    if (!fd || !err || !dir_err || !tmp || !final || !dir) {
        PyErr_NoMemory();
        goto done;
    }
    if (fd_items(fds, n, fd) < 0) {
        goto done;
    }
    if (bytes_items(tmps, n, tmp) < 0 || bytes_items(finals, n, final) < 0
        || bytes_items(dirs, nd, dir) < 0) {
        goto done;
    }
    /* The bytes objects stay referenced by the Fast sequences meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (fsync(fd[i]) != 0) {
            err[i] = errno ? errno : EIO;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        struct stat st;
        if (err[i]) {
            continue;
        }
        if (lstat(final[i], &st) == 0) {
            err[i] = EEXIST;
        }
        else if (errno != ENOENT) {
            err[i] = errno ? errno : EIO;
        }
        else if (rename(tmp[i], final[i]) != 0) {
            err[i] = errno ? errno : EIO;
        }
    }
    for (Py_ssize_t j = 0; j < nd; j++) {
        int dfd = open(dir[j], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0) {
            dir_err[j] = errno ? errno : EIO;
            continue;
        }
        if (fsync(dfd) != 0) {
            dir_err[j] = errno ? errno : EIO;
        }
        close(dfd);
    }
    Py_END_ALLOW_THREADS
    {
        PyObject *a = int_list(err, n), *b = int_list(dir_err, nd);
        if (a != NULL && b != NULL) {
            result = PyTuple_Pack(2, a, b);
        }
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
done:
    Py_XDECREF(fds);
    Py_XDECREF(tmps);
    Py_XDECREF(finals);
    Py_XDECREF(dirs);
    free(fd);
    free(err);
    free(dir_err);
    free(tmp);
    free(final);
    free(dir);
    return result;
}

/* remove_files and create_files: the rest of a bonzo.durable.Committer's
 * batch, with the GIL released once each. Removing a delivered message
 * (unlink, then close the last descriptor, which frees the inode) and
 * creating a new file both wait for the file system's journal while another
 * thread commits: here they wait in the committer's thread, not the event
 * loop's. */

PyDoc_STRVAR(remove_files_doc,
"remove_files(paths, fds) -> errors\n\n"
"unlink each path (a missing one is not an error), then close each fd.");

static PyObject *
remove_files(PyObject *self, PyObject *args)
{
    PyObject *paths_in, *fds_in;
    PyObject *paths = NULL, *fds = NULL, *result = NULL;
    int *fd = NULL, *err = NULL;
    const char **path = NULL;

    if (!PyArg_ParseTuple(args, "OO:remove_files", &paths_in, &fds_in)) {
        return NULL;
    }
    paths = PySequence_Fast(paths_in, "paths must be a sequence");
    fds = PySequence_Fast(fds_in, "fds must be a sequence");
    if (paths == NULL || fds == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(paths);
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(fds);
    fd = calloc((size_t)nf + 1, sizeof(int));
    err = calloc((size_t)n + 1, sizeof(int));
    path = calloc((size_t)n + 1, sizeof(char *));
    if (!fd || !err || !path) {
        PyErr_NoMemory();
        goto done;
    }
    if (fd_items(fds, nf, fd) < 0 || bytes_items(paths, n, path) < 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (unlink(path[i]) != 0 && errno != ENOENT) {
            err[i] = errno ? errno : EIO;
        }
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        close(fd[i]);
    }
    Py_END_ALLOW_THREADS
    result = int_list(err, n);
done:
    Py_XDECREF(paths);
    Py_XDECREF(fds);
    free(fd);
    free(err);
    free(path);
    return result;
}

PyDoc_STRVAR(create_files_doc,
"create_files(paths, mode) -> fds\n\n"
"create each path (exclusively, write-only, close-on-exec) with permissions\n"
"mode; its descriptor, or minus the errno if that failed.");

static PyObject *
create_files(PyObject *self, PyObject *args)
{
    PyObject *paths_in, *paths = NULL, *result = NULL;
    int mode;
    int *fd = NULL;
    const char **path = NULL;

    if (!PyArg_ParseTuple(args, "Oi:create_files", &paths_in, &mode)) {
        return NULL;
    }
    paths = PySequence_Fast(paths_in, "paths must be a sequence");
    if (paths == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(paths);
    fd = calloc((size_t)n + 1, sizeof(int));
    path = calloc((size_t)n + 1, sizeof(char *));
    if (!fd || !path) {
        PyErr_NoMemory();
        goto done;
    }
    if (bytes_items(paths, n, path) < 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        fd[i] = open(path[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode);
        if (fd[i] < 0) {
            fd[i] = -(errno ? errno : EIO);
        }
    }
    Py_END_ALLOW_THREADS
    result = int_list(fd, n);
done:
    Py_XDECREF(paths);
    free(fd);
    free(path);
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"scan_data", scan_data, METH_VARARGS, scan_data_doc},
    {"commit_files", commit_files, METH_VARARGS, commit_files_doc},
    {"remove_files", remove_files, METH_VARARGS, remove_files_doc},
    {"create_files", create_files, METH_VARARGS, create_files_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "bonzo._speedups",
    "C accelerators for the protocol core's DATA scan and bonzo.durable's "
    "batches (optional).",
    -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}
