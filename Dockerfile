# The platform image, ghcr.io/contentml/platform:<version>: KFP components, the KServe
# predictors (`contentml serve`), the Feast and MLflow servers, the scheduled pipelines. CPU only;
# the GPU ranks of a TrainJob run Dockerfile.training.
#
#   docker build -t ghcr.io/contentml/platform:0.1.0 .
#
# Two stages: `builder` installs the dependencies into /opt/venv (and has the compiler they
# need); the runtime stage gets that venv, the code in /app, and a non-root user.

FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# g++ compiles DeepSpeed's shared-memory collective (below); the runtime stage has no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Only the pins come in here, not the code: a code change leaves these layers cached.
COPY constraints.txt pyproject.toml ./
# The same order as `make install`.
RUN pip install pip==25.3 setuptools==80.9.0 wheel==0.45.1
# torch alone from PyTorch's CPU index (PyPI's Linux wheel is the CUDA build, with gigabytes of
# nvidia-* wheels), then its dependencies from PyPI at the versions in constraints.txt.
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -c constraints.txt torch==2.13.0
# DeepSpeed's setup.py imports torch, hence --no-build-isolation. No op is compiled but
# deepspeed_shm_comm, which DeepSpeed's CPU backend would otherwise JIT-compile at the start of
# every CPU fine-tune (tiny-cpu), and this image has no compiler at run time.
RUN DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
    pip install -c constraints.txt --no-build-isolation deepspeed==0.19.8
# Everything else pyproject.toml asks for (its [project] dependencies, not the dev extra).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && pip check


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="contentml platform" \
      org.opencontainers.image.description="KFP components, KServe predictors, Feast and MLflow servers of contentml" \
      org.opencontainers.image.source="https://github.com/contentml/contentml" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="NOASSERTION"

# uid/gid 1000 = contentml.cluster.RUN_AS_USER, the pods' runAsUser.
RUN groupadd --gid 1000 contentml \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/contentml \
       --shell /bin/bash contentml

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CONTENTML_HOME=/tmp/contentml \
    HF_HUB_OFFLINE=1

# The code, root-owned and read-only for the user. Paths are read relative to /app: recipes
# (`--config training/llm/configs/...`), and from the package root (contentml.settings.
# PACKAGE_ROOT): manifests/ for `contentml deploy`, pipelines/compiled/, serving/*.yaml.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contentml/ contentml/
COPY entrypoints/ entrypoints/
COPY components/ components/
COPY pipelines/ pipelines/
COPY training/ training/
COPY serving/ serving/
COPY feature_repo/ feature_repo/
COPY monitoring/ monitoring/
COPY manifests/ manifests/
# Editable on purpose: the code finds manifests/ and pipelines/compiled/ next to its packages,
# so Python must import it from /app, not from a copy in site-packages. This adds only the
# `contentml` command and a path hook to the venv; compileall because the user cannot write
# __pycache__ here.
RUN pip install --no-deps --no-build-isolation -e . \
    && pip check \
    && python -m compileall -q /app

USER 1000:1000
EXPOSE 8080
# Pods pass only arguments (`serve --models trend`, `features serve ...`); KFP tasks and the
# MLflow server replace the command.
ENTRYPOINT ["contentml"]
CMD ["serve", "--port", "8080"]
