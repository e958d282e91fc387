# The BraTS test phase as a container: a model package (brats-lightning export) and the suite; it reads the
# cases in /input and writes one <CASE>.nii.gz per case to /output. It needs no network at run time.
#
#   brats-lightning export --runs outputs/paper --out model.zip      # the package, in this folder
#   docker build -t brats-model .                                    # CPU torch
#   docker build -t brats-model --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   # CUDA
#   docker run --rm --network none [--gpus all] -v /path/to/cases:/input:ro -v /path/to/out:/output brats-model
#
# Extra arguments go to `brats-lightning predict` (e.g. `--device cpu`, `--keep-pipelines`). The entry command
# is the one tests/test_package.py runs. Not built in CI.
FROM python:3.11-slim

ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 WANDB_MODE=disabled MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/brats-lightning
COPY setup.cfg pyproject.toml README.md ./
COPY brats_lightning ./brats_lightning
RUN pip install "$TORCH" --index-url "$TORCH_INDEX" && pip install . && rm -rf /root/.cache

COPY model.zip /opt/model/model.zip
# verify the package once at build time (hashes, configs against weights) and show its card in the log
RUN brats-lightning model-info /opt/model/model.zip

ENTRYPOINT ["brats-lightning", "predict", "--model", "/opt/model/model.zip", "--data", "/input", "--out", "/output"]
