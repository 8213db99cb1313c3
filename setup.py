"""Packaging glue that pyproject.toml cannot express.

- `kernels/` is installed as `apollo_fast.kernels` (a bare top-level `kernels` would collide with
  an existing PyPI package).
- The optional CUDA extension in `csrc/` is compiled only when APOLLO_FAST_BUILD_CUDA=1 and a CUDA
  toolchain is present; otherwise nothing is compiled and the install needs no network.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

packages = find_packages(include=["apollo_fast", "apollo_fast.*"]) + ["apollo_fast.kernels"]
package_dir = {"apollo_fast.kernels": "kernels"}


def _cuda_extensions():
    if os.environ.get("APOLLO_FAST_BUILD_CUDA", "0") != "1":
        return [], {}
    sources = sorted(str(p) for p in Path("csrc").glob("*.c*") if p.suffix in (".cpp", ".cu"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        "apollo_fast._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"apollo_fast": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
