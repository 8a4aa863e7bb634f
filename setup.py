"""megaprorl: prolonged RL (ProRL v1/v2) for LLMs on Megatron-core, TensorRT-LLM and fused kernels.

The CUDA extension (csrc/) is built only where a CUDA build of torch and nvcc are present and
MEGAPRORL_BUILD_CUDA is not 0; everywhere else the package is pure Python and the kernels fall
back to Triton or torch.
"""

import os

from setuptools import find_packages, setup


def _cuda_extensions():
    mode = os.environ.get("MEGAPRORL_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = None
    if torch is None or torch.version.cuda is None or CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError("MEGAPRORL_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); "
                               "install with `pip install --no-build-isolation -e .[gpu]`")
        return [], {}
    ext = CUDAExtension(
        name="megaprorl._C_policy_loss",
        sources=["csrc/bindings.cpp", "csrc/policy_loss.cu"],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="megaprorl",
    version="0.1.0",
    description="Prolonged RL with verifiable rewards (ProRL) on Megatron-core with fused loss kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaprorl", "megaprorl.*", "triton_kernels", "triton_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.18",
        "omegaconf>=2.3",
        "numpy",
        "einops",
        "tqdm",
        "rich",
        "tensorboard",
        "matplotlib",
        "pyyaml",
        "psutil",  # megatron dist_checkpointing's writer processes
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "nvidia-modelopt", "triton"],
        # pyseccomp: ctypes binding of libseccomp (libseccomp2, on every Debian/Ubuntu) that compiles
        # the code sandbox's seccomp filter
        "rewards": ["math-verify>=0.7", "reasoning-gym>=0.1.20", "pyarrow", "langdetect>=1.0.9",
                    "pyseccomp>=0.1.2; sys_platform == 'linux'"],
        "hf": ["transformers>=4.45", "tokenizers", "safetensors"],
        "wandb": ["wandb"],
        # rollout.engine=trtllm: Ray runs TensorRT-LLM's workers; tensorrt-llm itself comes from NVIDIA's index
        # (PyPI holds a stub), for the machine's CUDA
        "trtllm": ["ray"],
        "dev": ["pytest", "hypothesis", "triton", "transformers>=4.45", "tokenizers", "safetensors", "wandb", "ray"],
    },
    entry_points={"console_scripts": ["megaprorl=megaprorl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
