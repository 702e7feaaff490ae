"""uvigu: Uni-ViGU (unified video generation and understanding) on Wan2.1, in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Tested versions are pinned in constraints.txt (used by the Makefile); ranges here leave room for TPU/GPU jax builds.
setup(
    name="uvigu",
    version="0.1.0",
    description="Uni-ViGU: one Wan2.1 DiT for text-to-video, video-to-text and joint generation (JAX / Flax NNX)",
    python_requires=">=3.10",
    packages=find_packages(include=["uvigu", "uvigu.*", "tools", "tools.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "einops>=0.8.2",
        "clu>=0.0.12",
        "jaxtyping>=0.3.11",
        "ml_dtypes",
        "numpy",
        "absl-py",
        "sentencepiece",  # the toy world's tokenizer (umT5's is sentencepiece too)
        "msgpack",  # toy-world record format
        "scipy",  # the toy-world detector's connected components
        # clu.metric_writers writes TensorBoard summaries through TensorFlow.
        "tensorflow-cpu",
        "tensorboard",
        "Pillow",
        "av",  # PyAV: reading and writing videos (uvigu.data.video)
        "tokenizers",  # umT5's tokenizer (uvigu.data.umt5_tokenizer), as transformers builds it
        "protobuf",  # reading a sentencepiece model to build that tokenizer
        "tqdm",  # progress bars of the commands
    ],
    extras_require={
        # The PyTorch references the parity tests compare against (CPU torch; never a CUDA build).
        "test": [
            "torch==2.13.0",
            "diffusers==0.42.1",
            "transformers>=5.23,<5.24",
            "safetensors",
            "sentencepiece",
            "nbclient",  # runs experiments/notebooks/uvigu_demo.ipynb as a test
            "nbformat",
            "ipykernel",
            "peft",  # LoRA parity against diffusers + PEFT
            "accelerate",  # peft needs it
            "matplotlib",  # the plots of experiments/ (prior_ablation); its report writer is tested
            "pytest",
            "pytest-xdist",
        ],
        # Reading original `.pth` releases.
        "torch": ["torch==2.13.0"],
    },
)
