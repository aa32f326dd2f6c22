#!/bin/bash
# World v2 on one GPU, in one run: train the toy teacher (VAE, then text encoder + UNet) and its judge (the
# toy classifier), then measure the base model's few-step baselines against its 50-step figures, then a
# time-capped demo. Each stage's outputs are copied to $OUT as soon as they exist.
#   device run:  bash bench/world_v2_gpu.sh            (carry .whl: diffusers and peft wheels)
#   CPU smoke:   SMOKE=1 OUT=/tmp/smoke bash bench/world_v2_gpu.sh
#   CONTINUE=1:  keep the committed VAE and judge, continue the committed UNet (frozen text encoder, Min-SNR-5)
set -o pipefail
if [ -d .whl ] && [ -z "$SMOKE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
PY=${PY:-python3}
W=stepdistill/toy/weights
mkdir -p $OUT
if [ -n "$SMOKE" ]; then
  TEACHER="--pool_size 400 --vae_steps 60 --vae_seconds 2 --unet_steps 30 --unet_batch 8 --vae_batch 8 --warmup 5 --unet_seconds 2"
  CLS="--steps 4 --batch 16 --pool-size 200"; DEV=cpu; NP=8; DEMO="--num-prompts 4"; DEMO_S=5
else
  TEACHER="--device cuda --workers 16 --unet_seconds ${UNET_SECONDS:-180} --vae_steps 6000 --vae_seconds ${VAE_SECONDS:-80}"
  TEACHER="$TEACHER --min_snr_gamma 5 --unet_steps ${UNET_STEPS:-40000}"
  CLS="--device cuda --workers 16 --steps 3000"; DEV=cuda; NP=200; DEMO=""; DEMO_S=${DEMO_SECONDS:-90}
fi
nvidia-smi -L 2>/dev/null
t0=$(date +%s)
if [ -n "$CONTINUE" ]; then
  rm -rf /tmp/base-teacher && cp -r $W/teacher /tmp/base-teacher
  TEACHER="$TEACHER --resume_from /tmp/base-teacher --seed_offset ${SEED_OFFSET:-11}"
fi
rm -rf $W/teacher
$PY train/train_toy_teacher.py --out $W/teacher --log_dir $OUT/tb $TEACHER 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -n 8 || exit 1
tar cf $OUT/teacher.tar -C $W teacher && echo "teacher done at $(( $(date +%s) - t0 )) s"
if [ -z "$CONTINUE" ]; then
  $PY train/train_toy_classifier.py --out $W/classifier.safetensors --vae $W/teacher $CLS 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -n 12 || exit 1
fi
cp $W/classifier.safetensors $OUT/ && echo "classifier done at $(( $(date +%s) - t0 )) s"
M="--method teacher=:ddim:steps=50:guidance=2 --method teacher-g3=:ddim:steps=50:guidance=3"
for g in 1 3 5; do
  M="$M --method base-lcm-g$g=:lcm:steps=1,2,4,8:guidance=$g --method base-ddim-g$g=:ddim:steps=1,2,4,8:guidance=$g"
  M="$M --method base-flow-g$g=:perflow:windows=1:steps=1,2,4,8:guidance=$g"
done
$PY -m stepdistill.cli eval --model toy --prompts toy:$NP --device $DEV --out $OUT/eval $M 2>&1 | grep -v -e "it/s\]" -e Warning -e deprecate -e "config attributes" | tail -n 60
echo "eval done at $(( $(date +%s) - t0 )) s"
tar cf $OUT/eval.tar -C $OUT eval && rm -rf $OUT/eval
timeout $DEMO_S $PY -m stepdistill.cli demo --out $OUT/demo --method all --device $DEV $DEMO 2>&1 | grep -v -e "it/s\]" -e Warning -e deprecate -e "config attributes" | tail -n 30
echo "demo stopped at $(( $(date +%s) - t0 )) s"
[ -d $OUT/demo ] && tar cf $OUT/demo.tar --exclude='*.safetensors' -C $OUT demo && rm -rf $OUT/demo
rm -rf $OUT/tb.tar; tar cf $OUT/tb.tar -C $OUT tb && rm -rf $OUT/tb
ls -la $OUT
