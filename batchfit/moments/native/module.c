/* The native kernel as an extension module, so that it is built and installed with the
 * package (setup.py builds it as BF_MODULE once per instruction-set level). Python never
 * calls into the module: batchfit.moments.native loads the file with ctypes, whose calls
 * release the GIL, and uses the bf_* functions of aggregate.c. */
#include <Python.h>

#ifndef BF_MODULE
#define BF_MODULE _aggregate
#endif
#define BF_CAT(a, b) a##b
#define BF_INIT(name) BF_CAT(PyInit_, name)
#define BF_QUOTE(name) #name
#define BF_NAME(name) BF_QUOTE(name)

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, BF_NAME(BF_MODULE),
    "batchfit's native moment kernel (used through ctypes by batchfit.moments.native)", -1,
    NULL,
};

PyMODINIT_FUNC BF_INIT(BF_MODULE)(void) { return PyModule_Create(&module); }
