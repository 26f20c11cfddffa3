"""Minimal embedding of vengine in another program, CPU only: load once, ask, print."""

import vengine

llm = vengine.LLM(device="cpu", max_context=4096)  # the default model: SmolLM2-135M-Instruct
reply = llm.chat([{"role": "user", "content": "Give me one word that rhymes with 'light'."}],
                 max_new_tokens=16)
print(reply.text)
print(reply.stats)  # prompt/completion tokens, seconds, decode tokens/s, density
