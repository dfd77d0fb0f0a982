#!/usr/bin/env bash
# The POPGym study as it was run into docs/popgym_study, in order; each line resumes where it stopped (finished runs
# are skipped). Every run: 1M steps per agent (POPGym's protocol: 15M), 64 envs, the script's defaults otherwise.
set -u
cd "$(dirname "$0")/.."
study() { python experiments/popgym_study.py --extra "--total-timesteps 1000000 --num-envs 64" "$@"; }
study --tasks RepeatFirst --difficulties Easy --configs rtrl:4 lstm:4 --set learning-rate=3e-4,1e-3,3e-3 \
  --out-dir docs/popgym_study/sweep                                   # the sweep: lr 3e-3 (forget bias +3) wins
study --tasks RepeatFirst --difficulties Easy --configs tbptt:4 --set learning-rate=1e-3,3e-3 --out-dir docs/popgym_study/sweep
study --tasks RepeatFirst --difficulties Easy --configs rtrl:4 lstm:4 --set forget-bias=0,1 --set learning-rate=3e-3 \
  --out-dir docs/popgym_study/sweep
python experiments/popgym_study.py --tasks RepeatFirst --difficulties Easy --configs rtrl:4 tbptt:4 lstm:4 \
  --set forget-bias=0,1,3 --extra "--total-timesteps 256000" --jobs 1 --out-dir docs/popgym_study/critic  # the collapse
study                                                                 # 6 tasks x 3 difficulties x 5 configurations, seeds 1-3
study --tasks RepeatPrevious --difficulties Easy Medium --configs rtrl:4 --set hidden-size=128,512 --jobs 1 \
  --out-dir docs/popgym_study/capacity                                # N = 128, 512 beside the study's 256
study --configs rtrl:4 tbptt:4 --set forget-bias=1 --out-dir docs/popgym_study/bias1  # the collapse's cause ablated:
study --difficulties Easy --configs lstm:4 lstm:episode --set forget-bias=1 \
  --out-dir docs/popgym_study/bias1                                   # forget bias +1, and the LSTM's control
study --tasks PositionOnlyCartPole --difficulties Easy --configs tbptt:8 tbptt:32 rtrl:8 rtrl:32 --set forget-bias=1 \
  --out-dir docs/popgym_study/bias1                                   # longer unrolls there
study --tasks PositionOnlyCartPole NoisyPositionOnlyCartPole --difficulties Easy --configs tbptt:episode \
  --set forget-bias=1 --out-dir docs/popgym_study/bias1                # the eLSTM's whole-episode BPTT there
