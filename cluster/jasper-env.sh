# Settings every jasper_ray Ray node needs, in one place. Sourced by scripts/local_cluster.sh and by the
# start commands of the cluster-launcher configs; cluster/kuberay/jasper-env.yaml carries the same values
# for Kubernetes (a test checks the two agree).

# HDF5's file locking fails on NFS/Lustre and serialises nothing we need: readers open files read-only.
export HDF5_USE_FILE_LOCKING=FALSE
# Shared-memory object store per node: batches in flight (read_jasper blocks, shard transfers), not datasets.
export JASPER_OBJECT_STORE_BYTES=${JASPER_OBJECT_STORE_BYTES:-2000000000}
# Where a node spills objects when its store is full: local disk, never the shared dataset volume.
export JASPER_SPILL_DIR=${JASPER_SPILL_DIR:-/tmp/ray-spill}
# Flags for `ray start` built from the above.
export JASPER_RAY_START_FLAGS="--object-store-memory=${JASPER_OBJECT_STORE_BYTES} --object-spilling-directory=${JASPER_SPILL_DIR} --disable-usage-stats"
