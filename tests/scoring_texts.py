"""Texts the scoring tests share: two chat turns behind one system header, so the second
text's first blocks are a prefix hit once the first has been scored."""

HEADER = (
    "<|im_start|>system\nYou are a helpful assistant who answers questions about science "
    "clearly, briefly and without jargon, for curious readers of any age.<|im_end|>\n"
    "<|im_start|>user\n"
)
TEXTS = [
    HEADER + "Name three primary colours and say why they are called primary.",
    HEADER + "Why does the moon show phases? Answer in two short sentences.",
]
