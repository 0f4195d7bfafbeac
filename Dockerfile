# The platform image: every Workflow step (`nmm stage …`), the PyTorchJob pods (`torchrun … nmm`)
# and the operator run from it.
#   docker build -t nmm:0.1.0 .                          # CPU
#   docker build --build-arg VARIANT=cuda -t nmm:0.1.0-cuda .   # CUDA (torch's CUDA wheels bundle the runtime)
# Runs as uid 1000 with a read-only root filesystem: HOME and scratch live on the /tmp emptyDir.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/nmm
ENV PATH=/opt/nmm/bin:$PATH
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    elif [ "$VARIANT" = "cuda" ]; then \
        pip install torch==2.13.0; \
    else echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 2; fi
COPY pyproject.toml README.md /src/
COPY platform /src/platform
COPY operators /src/operators
RUN pip install /src && python -m compileall -q /opt/nmm

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --gid 1000 nmm && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp nmm
COPY --from=build /opt/nmm /opt/nmm
ENV PATH=/opt/nmm/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["nmm"]
CMD ["--help"]
