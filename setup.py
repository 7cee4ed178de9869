from setuptools import find_packages, setup

setup(
    name="deepseek-pretrain",
    version="0.1.0",
    description="DeepSpeed pretraining framework for DeepSeek-family models (dense, MLA + DeepSeekMoE, V3-style MTP)",
    python_requires=">=3.10",
    # tests/ (fixtures, helpers, the gloo test harness) and bench/ are development tools, not part of the package.
    packages=find_packages(include=["pretrain", "pretrain.*", "parallel", "parallel.*", "data_pipeline",
                                    "data_pipeline.*", "posttrain", "posttrain.*"], exclude=["tests", "tests.*", "bench", "bench.*"]),
    package_data={"pretrain": ["presets/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "numpy",
    ],
    extras_require={
        # pretrain.export writes configs/tokenizers with transformers (the reference our exports are tested against)
        "export": ["transformers>=5.0", "huggingface_hub", "protobuf"],
        "test": ["pytest>=8", "transformers>=5.0", "huggingface_hub", "protobuf", "zstandard"],
        "parquet": ["pyarrow"],
        "zstd": ["zstandard"],
        # pretrain.info --plot and the labelled expert-load heatmap (TensorBoard falls back to raw pixels without it)
        "plot": ["matplotlib>=3.7"],
    },
)
