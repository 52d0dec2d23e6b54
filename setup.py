"""Builds meancache's C++ operators (csrc/) with ninja against the installed torch.

Install with ``pip install --no-build-isolation .`` so the extension is compiled for the torch already in
the environment (an isolated build would fetch another torch).
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "meancache._C",
            sources=["csrc/average_velocity_step.cpp"],
            # -fopenmp at compile time only: at::parallel_for's OpenMP region then runs on torch's own
            # (bundled) OpenMP runtime, which the undefined GOMP symbols resolve to when torch is loaded.
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
