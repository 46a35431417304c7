"""The paper's Table 4 at small scale: from one SFT policy and one reward model, train
REINFORCE, PPO, GRPO and Regular / Margin / Scaled DPO, then score every policy the same way on
held-out prompts and write <workdir>/results.md laid out like Table 4.

    python experiments/run.py --config experiments/configs/alignment.py --workdir runs/alignment
    python experiments/run.py --workdir runs/alignment --config \
        experiments/configs/alignment.py:policy=runs/sft/params,rm=runs/recipe/3_expo/params

Args: policy=PARAMS and rm=PARAMS (default: stages 0_sft and 0_reward_model train them: SFT on
well-rated responses and a helpfulness regression model), model=tiny|llama3.1-8b|..., data=DIR,
smoke. A stage's field is overridden by subscript: --config.stages['2_ppo'].rl.epochs=4.

Columns (`nemotron_jax.experiment.run_alignment_table`): the reward model's mean reward on
held-out prompts, the win rate against the initial policy judged by it, the mean response
length in tokens, the KL to the initial policy and each stage's training wall time. The
paper's own columns (MT-Bench, AlpacaEval, Arena Hard) need an external judge and are not here.
"""

import ml_collections

from experiments.configs import common, dpo, grpo, ppo, reinforce, rm_regression, sft


def get_config(arg=None):
    a = common.parse_arg(arg, lora=0, policy="", rm="", model="tiny", data="", smoke=False)
    shared = f"model={a.model}" + (f",data={a.data}" if a.data else "")
    shared += ",smoke" if a.smoke else ""
    shared += f",lora={a.lora}" if a.lora else ""
    stages = {}
    policy, rm = a.policy, a.rm
    if not policy:
        stages["0_sft"] = sft.get_config(shared)
        policy = "@0_sft"
    if not rm:
        stages["0_reward_model"] = rm_regression.get_config(f"attributes=helpfulness,{shared}")
        rm = "@0_reward_model"
    online = f"policy={policy},rm={rm},{shared}"
    stages["1_reinforce"] = reinforce.get_config(online)
    stages["2_ppo"] = ppo.get_config(online)
    stages["3_grpo"] = grpo.get_config(online)
    for i, variant in enumerate(("regular", "margin", "scaled")):
        stages[f"{4 + i}_dpo_{variant}"] = dpo.get_config(
            f"variant={variant},policy={policy},{shared}"
        )
    if a.smoke:  # seconds per stage: two updates each
        for stage in stages.values():
            stage.num_steps = 2
            stage.log_every = stage.eval_every = stage.checkpoint_every = 1
    c = ml_collections.ConfigDict()
    c.name = "alignment"
    c.stages = ml_collections.ConfigDict(stages)
    c.alignment = ml_collections.ConfigDict()
    # The evaluation reads this stage's initial policy, reward model, held-out prompts and
    # sampling settings (rl.eval_prompts, rl.eval_temperature, rl.max_new_tokens).
    c.alignment.judge = "1_reinforce"
    c.alignment.baseline = "SFT (initial policy)"
    # (stage, group, model) in the order of the paper's Table 4.
    c.alignment.rows = (
        ("4_dpo_regular", "offline RLHF", "Regular DPO"),
        ("5_dpo_margin", "offline RLHF", "Margin DPO"),
        ("6_dpo_scaled", "offline RLHF", "Scaled DPO"),
        ("2_ppo", "online RLHF", "PPO"),
        ("3_grpo", "online RLHF", "GRPO"),
        ("1_reinforce", "online RLHF", "REINFORCE"),
    )
    return c
