"""``python -m worker.store`` prints the Redis key layout as the README's Markdown table."""

from worker.store.keys import markdown_table

print(markdown_table())
