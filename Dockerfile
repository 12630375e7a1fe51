# imagenet-resnet on NVIDIA's PyTorch container, which brings CUDA, cuDNN, NCCL, PyTorch,
# torchvision and DALI built and tested together; pip adds only what the image lacks.
#
#   docker build -t imagenet-resnet .
#   docker run --gpus all --ipc=host -v /archives:/archives:ro -v /data:/data imagenet-resnet \
#       make prepare-imagenet SRC=/archives DEST=/data/imagenet
#   docker run --gpus all --ipc=host -v /data:/data imagenet-resnet \
#       launch/single_node.sh configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=/data/runs/rn50
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/imagenet-resnet
ENV PYTHON=python \
    PIP_NO_CACHE_DIR=1 \
    VENV=/usr

COPY pyproject.toml README.md Makefile ./
COPY imagenet_resnet ./imagenet_resnet
COPY data_prep ./data_prep
COPY configs ./configs
COPY launch ./launch
COPY benchmarks ./benchmarks

# Pin the image's own torch and torchvision so pip keeps them instead of fetching others.
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" > /tmp/keep.txt \
    && pip install --constraint /tmp/keep.txt -e '.[export]' \
    && python -c "import imagenet_resnet.train, nvidia.dali" \
    && touch /usr/.installed

CMD ["bash"]
