"""Build fastrec: the Python package, the Triton kernels (``kernels/`` installed as
``fastrec.kernels``) and the C++ CPU extension ``fastrec._C``.

Install for development with ``pip install --no-build-isolation -e .`` so that the
extension is built against the torch already in the environment.
"""

import os
import platform
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent


def _cxx_flags() -> list[str]:
    """-O3 and OpenMP (ATen's header-only ``at::parallel_for`` is serial without it; torch's
    own libgomp is what gets linked), tuned for the build machine.

    The extension is built where it runs (``pip install`` on that machine), so
    ``-march=native`` is the right default; ``FASTREC_CPU_ARCH`` overrides it
    (e.g. ``x86-64-v3`` for a portable AVX2 build).
    """
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]
    arch = os.environ.get("FASTREC_CPU_ARCH", "native")
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append(f"-march={arch}")
    else:
        flags.append(f"-mcpu={arch}")
    return flags


def _packages() -> list[str]:
    """Every package under ``fastrec/``, and ``kernels/`` (with any subpackage) as ``fastrec.kernels``."""
    kernels = find_packages(str(ROOT), include=["kernels", "kernels.*"])
    return find_packages(str(ROOT), include=["fastrec", "fastrec.*"]) + [f"fastrec.{name}" for name in kernels]


def _extensions() -> list[CppExtension]:
    if os.environ.get("FASTREC_NO_EXTENSION") == "1":
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    return [
        CppExtension(
            "fastrec._C",
            sources,
            extra_compile_args={"cxx": _cxx_flags()},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="fastrec",
    version="0.1.0",
    description="Fused Triton and C++ kernels for sequential recommender models",
    python_requires=">=3.10",
    packages=_packages(),
    package_data={"": ["*.json"]},  # the tables the code reads (conv dispatch, attention configs), in any package
    package_dir={"fastrec.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "ruff"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fastrec = fastrec.cli:main"]},
)
