# Image for KubeRay (k8s/rayjob.yaml) and any container-based cluster.
FROM rayproject/ray:2.60.0-py311-gpu
RUN sudo apt-get update -qq && sudo apt-get install -y -qq libsndfile1 && sudo rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY pipeline pipeline
COPY jobs jobs
