"""REINFORCE with a leave-one-out baseline against a frozen reward model (NeMo-Aligner's
algorithm, as used for Llama-3.1-Nemotron-70B-Instruct).

    python experiments/run.py --workdir runs/reinforce --config \
        experiments/configs/reinforce.py:policy=runs/sft/params,rm=runs/recipe/3_expo/params

Args:
    policy=PARAMS   the initial policy, also the frozen reference (e.g. an SFT run's params)
    rm=PARAMS       a reward-model params checkpoint (any reward-training run, or one converted
                    from HF); or reward_fn=module:function for a rule-based reward
    model=tiny|llama3.1-8b|llama3.1-70b|..., data=DIR (prompts of HelpSteer2-Preference),
    beta=0.01, kl=abs_k1|k1|k3, kl_reduce=mean|sum, k=4 (samples per prompt), smoke (with no
    policy and rm given, random tiny ones, said so at start: it checks the machinery only).

Defaults follow NeMo-Aligner's REINFORCE (beta 0.01, |k1| KL averaged over response tokens,
K = 4, baseline over EOS-terminated siblings, several minibatch updates per rollout batch,
temperature 1, no top-k / top-p), with a learning rate and sizes that suit the tiny model on CPU.
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(
        arg,
        lora=0,
        policy="",
        rm="",
        reward_fn="",
        model="tiny",
        data="",
        beta=0.01,
        kl="abs_k1",
        kl_reduce="mean",
        k=4,
        smoke=False,
    )
    c = common.base_config("reinforce", "reinforce")
    common.real_model(c, a.model)
    if a.data:
        c.data.source, c.data.dir = "dir", a.data
    c.init_from = a.policy  # initial policy
    c.rm_from = a.rm
    c.reward_fn = a.reward_fn
    c.rl.num_rollouts_per_prompt = a.k
    c.rl.beta = a.beta
    c.rl.kl_estimator = a.kl
    c.rl.kl_reduce = a.kl_reduce
    c.batch_size = 16  # sequences per optimizer update (minibatch of a rollout batch)
    c.eval_batch_size = 32

    c.num_steps = 60
    c.log_every = 5
    c.eval_every = 20
    c.checkpoint_every = 20
    c.optim.lr = 3e-5  # tiny policy: 1e-4 drifts to long, unterminated answers
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 0
    if a.model != "tiny":  # NeMo-Aligner's REINFORCE example, with the Llama-3.1 template
        c.data.template = "llama3"
        c.rl.prompts_per_step = 32
        c.rl.max_prompt_len = 2048
        c.rl.max_new_tokens = 2048
        c.rl.eval_prompts = 256
        c.batch_size = 32
        c.optim.lr = 1e-6
        c.num_steps = 313
        if a.model != "llama3.1-8b":  # a gathered 70B policy alone is 141 GB of bf16
            c.rl.sampler_weights = "per_step"
    common.lora(c, a.lora)
    if a.smoke:
        common.smoke(c)
        c.rl.prompts_per_step = 4
        c.rl.max_prompt_len = 64
        c.rl.max_new_tokens = 8
        c.rl.eval_prompts = 8
        c.batch_size = c.eval_batch_size = 8
        c.num_steps = 4
        c.log_every = c.eval_every = c.checkpoint_every = 2
        if not a.policy:  # a random tiny policy (and reward model), written at start
            c.init_from = "random"
            if not (a.rm or a.reward_fn):
                c.rm_from = "random"
    return c
