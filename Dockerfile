# voxrelay's container image: `voxrelay serve` as PID 1, non-root, the embedded engine inside.
#
#   make image                      # here: a debootstrap base and a host-built wheelhouse
#   docker build -t voxrelay .      # elsewhere, after `make wheelhouse`
#
# The build installs only from build/wheelhouse (made on the host by `make wheelhouse`,
# with the host's own pip configuration), so the build needs no package index at all.
# BASE must be a Debian-based image with python3 3.11 and its venv module.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
COPY build/wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/voxrelay \
 && /opt/voxrelay/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse voxrelay \
 && /opt/voxrelay/bin/pip uninstall --yes pip \
 && find /opt/voxrelay -name __pycache__ -prune -exec rm -rf {} +
# The licence texts of everything the image carries (see deploy/licenses/NOTICE).
COPY deploy/licenses/ /usr/share/licenses/voxrelay/
RUN /opt/voxrelay/bin/python /usr/share/licenses/voxrelay/collect.py /usr/share/licenses \
 && rm /usr/share/licenses/voxrelay/collect.py

FROM ${BASE}
RUN groupadd --system --gid 10001 voxrelay \
 && useradd --system --uid 10001 --gid voxrelay --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin voxrelay
COPY --from=build /opt/voxrelay /opt/voxrelay
COPY --from=build /usr/share/licenses /usr/share/licenses
ENV PATH=/opt/voxrelay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VOXRELAY_HOST=0.0.0.0
USER 10001:10001
WORKDIR /opt/voxrelay
EXPOSE 50051 8765 8080 9464
# /healthz answers while the process lives; the port follows VOXRELAY_WS_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/opt/voxrelay/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VOXRELAY_WS_PORT', '8765'), timeout=2)"]
STOPSIGNAL SIGTERM
# Exec form: voxrelay is PID 1 and gets SIGTERM itself (and drains).
ENTRYPOINT ["/opt/voxrelay/bin/voxrelay"]
CMD ["serve"]
