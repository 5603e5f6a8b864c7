"""CUDA kernels (*.cu) shipped as package data, compiled at run time through pycuda."""
