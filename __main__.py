from redge.agent.cli import main

main()
