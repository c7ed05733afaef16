# ZEDA server image. GPU hosts: on the official SGLang image of the pinned SGLang release (torch and SGLang come
# with it). CPU hosts: on any base with python3.11 and venv (docker/smoke.sh builds a Debian bookworm one).
#   docker build -t zeda .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro -e ZEDA_MODEL=/models/my-zeda zeda
#   docker build -t zeda:cpu --build-arg SGLANG_IMAGE=zeda-base:bookworm-py311 --build-arg ZEDA_EXTRAS=loadtest \
#     --build-arg ZEDA_DEVICE=cpu --build-arg TORCH_SPEC=torch==2.13.0+cpu .   # see docker/smoke.sh
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

# Extras installed with the project: sglang,loadtest on the SGLang base; loadtest on a CPU base.
ARG ZEDA_EXTRAS=sglang,loadtest
# The torch engine's device: cuda on the SGLang base, cpu on a CPU base.
ARG ZEDA_DEVICE=cuda
# Empty: torch as pyproject pins it (the SGLang base brings it). Set, e.g. torch==2.13.0+cpu: that torch instead
# (the CPU build; the pinned release on PyPI is the CUDA build, several GB), with the other requirements as pinned.
ARG TORCH_SPEC=
# With TORCH_SPEC: requirements left out (comma-separated). A CPU image: triton (1 GB installed): its kernels run
# on CUDA only (or in Triton's interpreter); the torch engine on CPU computes the experts with torch.
ARG ZEDA_WITHOUT=
# Where pip looks during the build (docker/smoke.sh: a wheelhouse on loopback); build-time only, not in the image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ZEDA_HOST=0.0.0.0 \
    ZEDA_PORT=8000 \
    ZEDA_MODEL=/opt/zeda/models/tiny-zeda \
    ZEDA_BACKEND=torch \
    ZEDA_DEVICE=${ZEDA_DEVICE}

# The project goes into the venv /opt/venv on every base: a system python may refuse installs (PEP 668, Debian).
# It sees the base's packages (--system-site-packages: the SGLang image's torch and SGLang); a base whose python3
# already is a venv is used as it is; without ensurepip (python3-venv) the venv borrows the system's pip.
RUN if python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then \
        ln -s "$(python3 -c 'import sys; print(sys.prefix)')" /opt/venv; \
    else \
        python3 -m venv --system-site-packages /opt/venv \
            || python3 -m venv --system-site-packages --without-pip /opt/venv; \
    fi \
    && /opt/venv/bin/python -m pip --version

WORKDIR /opt/zeda
COPY pyproject.toml README.md ./
COPY docker/requirements.py ./docker/requirements.py
COPY zeda_core ./zeda_core
COPY zeda_cli ./zeda_cli
COPY kernels ./kernels
COPY trainer ./trainer
COPY server ./server
COPY loadtest ./loadtest
COPY models ./models
# DL3013 asks for pinned versions: this installs the project itself, whose pyproject pins its dependencies.
# hadolint ignore=DL3013
RUN if [ -n "${TORCH_SPEC}" ]; then \
        python docker/requirements.py --extras "${ZEDA_EXTRAS}" --without "torch,${ZEDA_WITHOUT}" \
            > /tmp/requirements.txt \
        && python -m pip install --no-cache-dir "${TORCH_SPEC}" -r /tmp/requirements.txt \
        && python -m pip install --no-cache-dir --no-deps ".[${ZEDA_EXTRAS}]" \
        && rm /tmp/requirements.txt; \
    else \
        python -m pip install --no-cache-dir ".[${ZEDA_EXTRAS}]"; \
    fi \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 10001 zeda \
    && mkdir -p /data \
    && chown -R zeda /opt/zeda /data

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ZEDA_PORT', '8000'), timeout=4)"]
# Exec form: zeda is PID 1 and gets docker stop's SIGTERM itself (it drains the requests in flight, then exits 0).
ENTRYPOINT ["zeda", "serve"]
