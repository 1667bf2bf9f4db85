# The anomstream image: every service of docker-compose.yml runs one `anomstream` sub-command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY common ./common
COPY stream ./stream
COPY detectors ./detectors
COPY sinks ./sinks
COPY dashboard ./dashboard
COPY app ./app
RUN pip install . \
    && useradd --create-home --uid 10001 anomstream \
    && mkdir -p /data/lake /data/alert-state /data/labels \
    && chown -R anomstream /data

# Named volumes mounted on /data/* start with this ownership, so the services can write them.
USER anomstream
WORKDIR /data
CMD ["anomstream", "--help"]
