#!/bin/bash
# A Cloud TPU VM pod slice (e.g. v4-32): the same command on every worker. jax.distributed detects
# the slice itself (--distributed auto); the workdir must be a disk every worker mounts.
TPU=${TPU:-my-tpu}
ZONE=${ZONE:-us-central2-b}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd bn_jax && pip install -e '.[tpu]' && python -m experiments.cifar --bn_only --model resnet110 --workdir /mnt/shared/r110_bn"
