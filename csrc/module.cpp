// Python module init for the extension fastrec._C.
//
// The module itself is empty: the kernels are registered with the dispatcher by
// TORCH_LIBRARY_FRAGMENT blocks in the other translation units (attention.cpp, encoder.cpp,
// rnn.cpp, conv.cpp, caser.cpp, dropout.cpp), which run when this shared library is loaded. Only
// <Python.h> is included here so that this file compiles in a second, not in the ~40 s a torch
// header costs.
#include <Python.h>

static struct PyModuleDef fastrec_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastrec CPU kernels. Importing this module (after torch) registers the operators "
    "torch.ops.fastrec.* (e.g. attention_forward_cpp, attention_backward_cpp).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastrec_c_module); }
