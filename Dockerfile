# pglogrepl-bridge as an image: the wheel is built with the C accelerator in a builder stage
# (which has a compiler), then installed into a slim runtime stage that runs as a non-root
# user. `docker build -t pglogrepl-bridge .`, then e.g.
#   docker run --rm -e PGLOGREPL_DSN=... pglogrepl-bridge tail --slot s --publication p
# The install steps are container/build-wheel.sh, which the tests run on a read-only copy.

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN sh /src/container/build-wheel.sh /src /wheels

FROM python:3.11-slim
# /data belongs to the user: a volume mounted there starts out writable (compose's replica)
RUN useradd --system --create-home --uid 10001 bridge \
 && mkdir /data && chown bridge /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER bridge
WORKDIR /home/bridge
ENTRYPOINT ["pglogrepl-bridge"]
CMD ["--help"]
