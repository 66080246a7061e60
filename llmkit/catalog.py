"""Names a user chooses from on the command line, with one line each: read by the CLI's help (without the cost
of importing the config schema) and checked by the schema.
"""

# The fine-tuning tasks by name, with what each trains (`--task`, its help and the docs); each one's implementation
# is its row in llmkit.train.tasks.TASKS.
FINETUNE_TASKS = {
    "sft": "supervised fine-tuning: chat, instruction, prompt/completion or text rows",
    "classify": "text classification: text + label rows, a classification head on any HF model",
    "dpo": "direct preference optimization (sigmoid, IPO, hinge or robust loss) on pairs",
    "orpo": "odds-ratio preference optimization: SFT on chosen answers plus an odds-ratio term",
    "simpo": "simple preference optimization: length-normalized rewards, no reference",
    "kto": "Kahneman-Tversky optimization: single answers labelled desirable or not",
    "reward": "reward model (Bradley-Terry) on preference pairs: one score per prompt + answer",
    "grpo": "online RL: answers sampled by the model, scored by task files, reward models or functions (GRPO family)",
    "distill": "SFT rows taught by a teacher model (forward/reverse KL or JSD, mixed with the data loss)",
}
