"""Two-pass tool use with plain transformers on a moss-export directory (docs/hf_chat.md).

python docs/hf_tool_chat.py MODEL_DIR "What is 23 times 17?"
"""

import re
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from moss_train.chat.plugins import Calculator  # the tool: any function from the argument to its answer

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "Calculate",
        "description": "MOSS's calculator: Calculate(expression)",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


def generate(model, tokenizer, messages) -> str:
    """One pass: generation stops at <eoc> (a tool must run) or <eom> (generation_config.json)."""
    inputs = tokenizer.apply_chat_template(
        messages, tools=[CALCULATOR], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def main(model_dir: str, question: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    messages = [{"role": "user", "content": question}]
    first = generate(model, tokenizer, messages)  # ' thoughts<eot>\n<|Commands|>: Calculate("...")<eoc>', or a reply
    print("pass one:", repr(first))
    commands = (
        re.findall(r'Calculate\("([^"]*)"\)', first.split("<|Commands|>:")[-1]) if first.endswith("<eoc>") else []
    )
    if not commands:  # answered without a tool
        print("reply:", first.split("<|MOSS|>:")[-1].removesuffix("<eom>").strip())
        return
    messages.append(
        {
            "role": "assistant",
            "content": first.split("<eot>")[0].strip(),  # the inner thoughts
            "tool_calls": [
                {"type": "function", "function": {"name": "Calculate", "arguments": {"expression": e}}}
                for e in commands
            ],
        }
    )
    for expression in commands:  # one tool message per call, in order
        answer = Calculator().run(expression)
        print(f"tool: Calculate({expression!r}) -> {answer!r}")
        messages.append({"role": "tool", "content": answer})
    reply = generate(model, tokenizer, messages)  # ' It is ...<eom>'
    print("reply:", reply.removesuffix("<eom>").strip())


if __name__ == "__main__":  # the calculator runs in a worker process, which imports this file
    main(sys.argv[1], sys.argv[2])
