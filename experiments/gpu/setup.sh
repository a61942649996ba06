# Sourced by the GPU check scripts: the repository root as working directory, the pure-Python
# wheels the GPU image lacks (.gpu/whl/: ml_collections, tensorboardX, flatbuffers) on
# PYTHONPATH, and ../shared/data/signs pointing at the data copy in .gpu/signs/.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../shared/data && ln -sfn $PWD/.gpu/signs ../shared/data/signs
