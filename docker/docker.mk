# Container targets (docs/docker.md), included by the Makefile:
#   make docker-build [BASE_IMAGE=...] [IMAGE=gpt-train TAG=latest]
#   make docker-push                                   push IMAGE:TAG (IMAGE may name a registry)
#   make docker-run [GPUS=4|all|0,2|0] [CONFIG=default] [ARGS="key=value ..."]
# DRY_RUN=1 prints the docker command instead of running it. Every value goes into the shell line quoted;
# ARGS is split on spaces (one key=value per word) and each word is quoted. DOCKER_BUILD_FLAGS and
# DOCKER_RUN_FLAGS are extra docker flags, passed to the shell as written.

IMAGE ?= gpt-train
TAG ?= latest
# Empty: the CUDA PyTorch image pinned in docker/Dockerfile (ARG BASE_IMAGE).
BASE_IMAGE ?=
DOCKER ?= docker
DOCKERFILE ?= docker/Dockerfile
DOCKER_BUILD_FLAGS ?=
DOCKER_RUN_FLAGS ?=
DRY_RUN ?= 0

# GPUS: all | a count N (the first N GPUs; 0 = no GPU, train on CPU) | a list with a comma (GPUS=0,2; a single
# GPU by index is GPUS=3, = GPU 3 alone: spell it with a trailing comma, GPUS=3,) | device=... (docker's own
# syntax, e.g. GPUS=device=GPU-3a1f...). Default: all where the host has nvidia-smi, else 0.
GPUS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),all,0)
# Host folders: RUNS_DIR -> /runs (run_dir runs/NAME of the presets lands in RUNS_DIR/NAME), CACHE_DIR -> /cache
# (compiled kernels, HF and wandb caches), DATA_DIR (read-only, only if it exists) -> the same relative path
# under /app (relative) or the same absolute path, so a config's data.dir means the same thing inside and out.
RUNS_DIR ?= runs
CACHE_DIR ?= .cache
DATA_DIR ?= data/moby-dick-bpe16k
DATA_MODE ?= ro
# The repository's configs/ at /app/configs (read-only): CONFIG=configs/my.yaml works without a rebuild.
CONFIGS_DIR ?= configs
# Shared memory for DataLoader workers and NCCL: the host's IPC namespace, or with IPC= a private /dev/shm.
IPC ?= host
SHM_SIZE ?= 16g
# Host networking: NCCL across nodes, wandb online. NETWORK=none proves a run needs no network.
NETWORK ?= host
# Seconds `docker stop` waits after SIGTERM before SIGKILL: the run checkpoints at the next step and exits.
STOP_TIMEOUT ?= 180
# The container's name, also given to the ranks (GPT_TRAIN_CONTAINER), who record it in the run's start event:
# that is how `gpt-train cancel RUN` finds the container to stop and `gpt-train runs` tells whether it still
# runs. Drawn once per make call, so the flag and the variable agree. DOCKER_NAME= leaves it unnamed.
_name_suffix := $(shell od -An -N3 -tx1 /dev/urandom 2>/dev/null | tr -d ' \n')
DOCKER_NAME ?= gpt-train-$(_name_suffix)
# GPU hosts: unlimited locked memory (NCCL, pinned host buffers, RDMA) and a 64 MB stack (NVIDIA's advice for
# their PyTorch containers). Not on CPU: raising memlock needs CAP_SYS_RESOURCE, which some hosts' root lacks.
GPU_ULIMITS ?= memlock=-1 stack=67108864
CPU_ULIMITS ?=
# Variables passed by name only, `-e NAME`, for those set in make's environment or command line: docker copies
# each value from its own environment, so values never appear in the command line, in `ps`, or in DRY_RUN
# output. (An unset name is left out: `-e NAME` with NAME unset would remove the image's own value.)
PASS_ENV ?= WANDB_API_KEY WANDB_ENTITY WANDB_PROJECT WANDB_MODE WANDB_BASE_URL HF_TOKEN \
	AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_REGION AWS_DEFAULT_REGION AWS_PROFILE \
	AWS_ENDPOINT_URL GOOGLE_CLOUD_PROJECT NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA TORCHRUN_ARGS OMP_NUM_THREADS
# GCS: the key file GOOGLE_APPLICATION_CREDENTIALS names is mounted read-only (only its path is in the command).
GCP_KEY_MOUNT := /run/secrets/gcp-credentials.json
# AWS config and credential files, mounted read-only when the folder exists (AWS_DIR= to skip).
AWS_DIR ?= $(HOME)/.aws
AWS_MOUNT := /run/secrets/aws
# Who the container runs as: launch/local.py container_user(), the rule `gpt-train-submit --backend docker`
# follows too (asked with the standard library only, `python3 -m launch.local user`): a non-root caller as
# itself, so files in RUNS_DIR are the caller's; root as the owner of the working directory (the checkout),
# who can write the folders mounted from it. Missing RUNS_DIR/CACHE_DIR are created owned by that user.
# DOCKER_USER= runs the image's own user (uid/gid below, docker/Dockerfile APP_UID/APP_GID).
IMAGE_UID ?= 1000
IMAGE_GID ?= 1000
PYTHON ?= python3
_repo := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
DOCKER_USER ?= $(or $(shell PYTHONPATH=$(call _q,$(_repo)) $(PYTHON) -m launch.local user),\
  $(error cannot tell the container's user ($(PYTHON) -m launch.local user): set DOCKER_USER=UID:GID))

# ---- internals ---------------------------------------------------------------------------------------------
# q: one shell word, single-quoted
_q = '$(subst ','\'',$(1))'
_comma := ,
_empty :=
_space := $(_empty) $(_empty)
_gpus = $(strip $(GPUS))
_is_count = $(if $(1),$(if $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1))))))))))),,y))
_gpu_list = $(subst $(_space),$(_comma),$(strip $(subst $(_comma), ,$(1))))
_gpu_words = $(words $(subst $(_comma), ,$(1)))
# -> the --gpus value ("" = no GPU) and the process count ("" = the entrypoint counts the GPUs it sees)
_gpus_value = $(strip \
  $(if $(filter all,$(_gpus)),all,\
  $(if $(filter device=%,$(_gpus)),$(_gpus),\
  $(if $(findstring $(_comma),$(_gpus)),device=$(call _gpu_list,$(_gpus)),\
  $(if $(call _is_count,$(_gpus)),$(if $(filter 0,$(_gpus)),,device=$(shell seq -s , 0 $$(($(_gpus) - 1)))),\
  $(error GPUS='$(GPUS)': use all, a count (0 = CPU), a list like 0,2 (one GPU by index: 3,), or device=...))))))
_nproc = $(if $(filter all,$(_gpus)),,$(if $(_gpus_value),$(call _gpu_words,$(patsubst device=%,%,$(_gpus_value)))))
_ulimits = $(if $(_gpus_value),$(GPU_ULIMITS),$(CPU_ULIMITS))
_abs = $(abspath $(1))
_data_target = $(if $(filter /%,$(DATA_DIR)),$(_abs_data),/app/$(DATA_DIR))
_abs_data = $(call _abs,$(DATA_DIR))

_docker_build = $(DOCKER) build -f $(call _q,$(DOCKERFILE)) -t $(call _q,$(IMAGE):$(TAG)) \
  $(if $(strip $(BASE_IMAGE)),--build-arg $(call _q,BASE_IMAGE=$(strip $(BASE_IMAGE)))) \
  --label $(call _q,org.opencontainers.image.revision=$(shell git rev-parse --short HEAD 2>/dev/null)) \
  $(DOCKER_BUILD_FLAGS) .

_docker_run = $(DOCKER) run --rm --init \
  $(if $(_gpus_value),--gpus $(if $(filter all,$(_gpus_value)),all,$(call _q,"$(_gpus_value)"))) \
  $(if $(_nproc),-e $(call _q,NPROC_PER_NODE=$(_nproc))) \
  $(if $(strip $(IPC)),--ipc=$(call _q,$(strip $(IPC))),--shm-size=$(call _q,$(SHM_SIZE))) \
  $(foreach u,$(_ulimits),--ulimit $(call _q,$(u))) \
  $(if $(strip $(NETWORK)),--network=$(call _q,$(strip $(NETWORK)))) \
  --stop-timeout=$(call _q,$(STOP_TIMEOUT)) \
  $(if $(strip $(DOCKER_NAME)),--name=$(call _q,$(strip $(DOCKER_NAME))) -e $(call _q,GPT_TRAIN_CONTAINER=$(strip $(DOCKER_NAME)))) \
  $(if $(strip $(DOCKER_USER)),--user=$(call _q,$(strip $(DOCKER_USER)))) \
  -v $(call _q,$(call _abs,$(RUNS_DIR)):/runs) \
  -v $(call _q,$(call _abs,$(CACHE_DIR)):/cache) \
  $(if $(and $(strip $(DATA_DIR)),$(wildcard $(DATA_DIR))),-v $(call _q,$(_abs_data):$(_data_target):$(DATA_MODE))) \
  $(if $(and $(strip $(CONFIGS_DIR)),$(wildcard $(CONFIGS_DIR))),-v $(call _q,$(call _abs,$(CONFIGS_DIR)):/app/configs:ro)) \
  $(foreach v,$(PASS_ENV),$(if $(filter environment% command,$(origin $(v))),-e $(call _q,$(v)))) \
  $(if $(strip $(GOOGLE_APPLICATION_CREDENTIALS)),-v $(call _q,$(call _abs,$(GOOGLE_APPLICATION_CREDENTIALS)):$(GCP_KEY_MOUNT):ro) -e $(call _q,GOOGLE_APPLICATION_CREDENTIALS=$(GCP_KEY_MOUNT))) \
  $(if $(and $(strip $(AWS_DIR)),$(wildcard $(AWS_DIR))),-v $(call _q,$(call _abs,$(AWS_DIR)):$(AWS_MOUNT):ro) -e $(call _q,AWS_CONFIG_FILE=$(AWS_MOUNT)/config) -e $(call _q,AWS_SHARED_CREDENTIALS_FILE=$(AWS_MOUNT)/credentials)) \
  $(DOCKER_RUN_FLAGS) \
  $(call _q,$(IMAGE):$(TAG)) $(if $(strip $(CONFIG)),$(call _q,$(strip $(CONFIG)))) $(foreach a,$(ARGS),$(call _q,$(a)))

# DRY_RUN=1: print the command (exactly the shell line that would run), else run it
_exec = $(if $(filter 1,$(DRY_RUN)),@printf '%s\n' $(call _q,$(strip $(1))),$(strip $(1)))

# Host folders the container writes: created if missing (as root: owned by the container's user)
_mkdirs = $(if $(filter 1,$(DRY_RUN)),@:,@for d in $(call _q,$(call _abs,$(RUNS_DIR))) $(call _q,$(call _abs,$(CACHE_DIR))); do \
	if [ ! -d "$$d" ]; then mkdir -p "$$d" && if [ "$$(id -u)" = 0 ]; then \
	chown $(call _q,$(or $(strip $(DOCKER_USER)),$(IMAGE_UID):$(IMAGE_GID))) "$$d"; fi; fi; done)

.PHONY: docker-build docker-push docker-run

docker-build:
	$(call _exec,$(_docker_build))

docker-push:
	$(call _exec,$(DOCKER) push $(call _q,$(IMAGE):$(TAG)))

docker-run:
	$(_mkdirs)
	$(call _exec,$(_docker_run))
