from agent_workers.cli import main

main()
