"""Streaming: print the reply as it is generated, then keep talking with the KV cache reused."""

import sys

import vengine
from vengine.engine.chat import ChatSession

llm = vengine.LLM(max_context=8192)
for piece in llm.stream("The three laws of motion are", max_new_tokens=60):
    sys.stdout.write(piece)
    sys.stdout.flush()
print()

session = ChatSession(llm, system="You answer in one short sentence.")
for turn in ["My favourite colour is green.", "What is my favourite colour?"]:
    print(f"> {turn}")
    print("".join(session.send(turn, max_new_tokens=40)))
    print(f"  (prefilled {session.prefilled_tokens} new tokens, context {session.context_tokens()})")
