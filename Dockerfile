# ZEDA server image for GPU hosts, on the official SGLang image of the pinned SGLang release.
#   docker build -t zeda .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro -e ZEDA_MODEL=/models/my-zeda zeda
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    ZEDA_HOST=0.0.0.0 \
    ZEDA_PORT=8000 \
    ZEDA_MODEL=/opt/zeda/models/tiny-zeda \
    ZEDA_BACKEND=torch \
    ZEDA_DEVICE=cuda

WORKDIR /opt/zeda
COPY pyproject.toml README.md ./
COPY zeda_core ./zeda_core
COPY zeda_cli ./zeda_cli
COPY kernels ./kernels
COPY trainer ./trainer
COPY server ./server
COPY loadtest ./loadtest
COPY models ./models
# SGLang and torch come with the base image; the sglang extra pins the same release. DL3013 asks
# for pinned versions: this installs the project itself, whose pyproject pins its dependencies.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[sglang,loadtest]" \
    && useradd --create-home --uid 10001 zeda \
    && chown -R zeda /opt/zeda

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ZEDA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["zeda", "serve"]
