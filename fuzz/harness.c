/* libFuzzer entry point for repo-stream's C core: embeds CPython, links the core's sources
 * (instrumented for coverage, ASan and UBSan) as repo_stream._native, and hands every input to
 * fuzz/target.py's fuzz_one(), which runs it through the C core and the pure-Python reference.
 * Any exception from fuzz_one (a divergence, or an error that is not a RepoStreamError) aborts. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

PyMODINIT_FUNC PyInit__native(void);
static PyObject *fuzz_one;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    Py_Initialize();
    PyObject *native = PyInit__native();
    PyObject *modules = PyImport_GetModuleDict();
    if (native == NULL || PyDict_SetItemString(modules, "repo_stream._native", native) < 0) goto fail;
    PyObject *target = PyImport_ImportModule("fuzz.target");
    if (target == NULL) goto fail;
    PyObject *impl = PyImport_ImportModule("repo_stream.core.implementation");
    PyObject *c = impl ? PyObject_GetAttrString(impl, "C") : NULL;
    if (c == NULL || c == Py_None) {
        fprintf(stderr, "the C core did not load\n");
        goto fail;
    }
    fuzz_one = PyObject_GetAttrString(target, "fuzz_one");
    if (fuzz_one == NULL) goto fail;
    return 0;
fail:
    PyErr_Print();
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    PyObject *arg = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    if (arg == NULL) abort();
    PyObject *r = PyObject_CallOneArg(fuzz_one, arg);
    Py_DECREF(arg);
    if (r == NULL) {
        PyErr_Print();
        abort();
    }
    Py_DECREF(r);
    return 0;
}
