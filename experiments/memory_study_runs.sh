#!/usr/bin/env bash
# The memory-length study as it was run into docs/memory_study, in order of priority; each line resumes where it
# stopped (finished runs are skipped). The flags of every run: the sweep's choice (docs/memory_study/sweep).
set -u
cd "$(dirname "$0")/.."
study() { python experiments/memory_study.py --extra "--forget-bias 3 --learning-rate 3e-3 --save-model" "$@"; }
study --configs rtrl:4 tbptt:4 lstm:32 --seeds 1                    # 23 lengths each
study --configs rtrl:4 --seeds 2 3
study --configs rtrl:4:stem=mlp --settings 3 5 9 13                 # where RTRL's exactness ends
study --configs tbptt:4 lstm:32 --seeds 2
study --configs rtrl:4:forget-bias=4 --seeds 1                      # after the diagnosis (docs/memory_study/limits_bias)
study --configs lstm:4 ff:4 --seeds 1
study --configs lstm:32:forget-bias=2:learning-rate=1e-3 --seeds 1 # the baseline at its own best in the sweep
study --configs rtrl:1 --seeds 1 --settings 4 9 13 17               # fully online, four lengths
study --configs rtrl:1 --seeds 1 2 3                                # fully online, every length
study --configs tbptt:4 lstm:32 --seeds 3
study --configs rtrl:4:forget-bias=4 lstm:4 ff:4 --seeds 2 3
study --experiment memory_size --configs rtrl:4 tbptt:4 lstm:32 --seeds 1   # 17 numbers of bits, memory length 2
study --configs rtrl:4:learning-rate=1e-3 rtrl:4:num-envs=4 rtrl:4:num-envs=64 --settings 20 22 --seeds 1 \
  --out-dir docs/memory_study/limits_other                           # the learning rate and the number of envs
# issue 23: the headline at 10 seeds, each configuration and length one process of 10 agents (--num-seeds 10); run with
# --script pointing at a copy of rtrl_a2c_bsuite.py as of commit 1e476f1, so that later edits could not reach the runs
study --configs rtrl:4 tbptt:4 lstm:32 rtrl:1 --seeds 1 2 3 4 5 6 7 8 9 10 --out-dir docs/memory_study/seeds10
# issue 24: the frozen-stem recipe. The stem: tbptt:4 --stem mlp at memory length 4 (memory_len/3), where a truncated
# gradient suffices (0.037 wrong), run in experiments/work; then rtrl:4 and the tbptt:4 control on it, frozen (the
# script as of 82d325e, a copy)
(cd experiments/work && python ../../rtrl_a2c_bsuite.py --env-id memory_len/3 --core tbptt --stem mlp --forget-bias 3 \
  --learning-rate 3e-3 --run-name stem_pretrain_tbptt4_L4 --save-model)
python experiments/memory_study.py --configs rtrl:4 tbptt:4 --settings 9 13 15 17 19 --seeds 1 2 3 4 5 6 7 8 9 10 --extra \
  "--forget-bias 3 --learning-rate 3e-3 --stem mlp --init-stem-from runs/stem_pretrain_tbptt4_L4/model.pt --freeze-stem --save-model" \
  --out-dir docs/memory_study/frozen_stem
# issue 24: the forget gate set by the horizon (chrono, T_max 100), 3 seeds, every length; the script as of 1e3679d
# (a copy, as above)
study --configs rtrl:4:forget-init=chrono lstm:32:forget-init=chrono --seeds 1 2 3 --out-dir docs/memory_study/chrono
# issue 24: capacity, memory_size at N = 128, 256, 512, 3 seeds (the script as of 1e3679d, a copy)
python experiments/memory_study.py --experiment memory_size --configs rtrl:4:hidden-size=128 rtrl:4:hidden-size=256 \
  rtrl:4:hidden-size=512 lstm:32:hidden-size=128 lstm:32:hidden-size=256 lstm:32:hidden-size=512 --seeds 1 2 3 \
  --extra "--forget-bias 3 --learning-rate 3e-3" --out-dir docs/memory_study/capacity
