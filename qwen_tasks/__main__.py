from qwen_tasks.cli import main

main()
