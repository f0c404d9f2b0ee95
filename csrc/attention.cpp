#include <torch/extension.h>
TORCH_LIBRARY(fastrec, m) {}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
