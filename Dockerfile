# dia2-trt, CPU image: the torch-free runtime and its server (`dia2-rt serve`) on ONNX Runtime.
#
#   podman build -t dia2-trt:cpu .                      (or docker build; any Debian-like Python base:
#   podman build --build-arg BASE_IMAGE=python:3.11-slim -t dia2-trt:cpu .)
#   podman run --rm -p 8000:8000 -v "$PWD/artifacts/tiny:/artifacts:ro" dia2-trt:cpu
#
# Artifacts are not baked in: mount a `dia2-export build` folder at /artifacts. Offline builds:
# put wheels for every dependency in build/wheelhouse first (pip wheel -w build/wheelhouse
# '.[serve]' setuptools wheel); the install then uses only them (--no-index).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
COPY . /src
WORKDIR /src
# One venv, copied whole into the final stage: no compilers, caches or sources are left in the image.
RUN python3 -m venv /opt/dia2 \
 && if ls build/wheelhouse/*.whl >/dev/null 2>&1; then set -- --no-index --find-links build/wheelhouse; fi \
 && /opt/dia2/bin/pip install --no-cache-dir --disable-pip-version-check "$@" '.[serve]'

FROM ${BASE_IMAGE}
COPY --from=build /opt/dia2 /opt/dia2
ENV PATH=/opt/dia2/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A user without a home or a shell login: the server needs to read the artifacts and nothing more.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# 0.0.0.0 inside the container's own network namespace: reachable only through a published port.
CMD ["dia2-rt", "serve", "--artifacts", "/artifacts", "--host", "0.0.0.0", "--port", "8000"]
