# plm-serve on a CUDA host: `docker build -t plm-serve .` then
#   docker run --gpus all -p 8000:8000 -v /models:/models plm-serve --model /models/Perception-LM-1B --config configs/plm-1b.yaml
# With no --model the container serves the tiny random-weight demo model.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
RUN pip install --upgrade pip \
    && pip install "torch>=2.11" --index-url https://download.pytorch.org/whl/cu128 \
    && pip install fastapi uvicorn pydantic safetensors tokenizers jinja2 pillow av httpx numpy pyyaml \
        prometheus-client tqdm
# The Llama 3 tokenizer file for the demo model. llama-models also ships a top-level `models` package that would
# shadow ours, so it goes to a folder outside the import path (processors/tiktoken_convert.py looks there).
RUN pip install --no-deps --target /opt/venv/llama-models llama-models==0.3.0

COPY server/ server/
COPY offline/ offline/
COPY engine/ engine/
COPY models/ models/
COPY processors/ processors/
COPY configs/ configs/
RUN pip install --no-deps -e .

RUN useradd --create-home plm && mkdir -p /models && chown plm /models
USER plm
ENV HF_HOME=/home/plm/.cache/huggingface
EXPOSE 8000
ENTRYPOINT ["plm-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
