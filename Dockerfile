FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DPR_LENS_CACHE=/home/lens/.cache/dpr-lens
# A container is usually reachable by others: visitors upload corpora and pick only allowlisted models.
ENV DPR_LENS_PUBLIC=1
RUN useradd --create-home --uid 1000 lens
WORKDIR /app

# The CPU build of torch keeps the image small; a plain `pip install torch` pulls CUDA.
RUN pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY --chown=lens:lens . .
USER lens
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).status != 200)"
CMD ["python", "-m", "streamlit", "run", "app.py", "--server.port=8501", "--server.address=0.0.0.0"]
