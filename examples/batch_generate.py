"""Batch generation from Python with continuous batching and vAttention.

`completions()` yields each request the moment it finishes, so results can be stored as they come.
"""

import vengine
from vengine import SamplingParams

llm = vengine.LLM(max_context=4096, max_batch=4,
                  attention=vengine.VAttention(epsilon=0.1, delta=0.1, seed=0))
topics = ["volcanoes", "honey bees", "the printing press", "tides", "glass", "chess"]
requests = [
    (topic, llm.chat_ids([{"role": "user", "content": f"Two sentences about {topic}."}]),
     SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=i))
    for i, topic in enumerate(topics)
]
for topic, completion in llm.completions(requests):
    print(f"[{topic}] ({completion.stats['completion_tokens']} tokens, "
          f"density {completion.stats['density']:.2f}) {completion.text!r}")
