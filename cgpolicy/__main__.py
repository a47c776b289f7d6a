from cgpolicy.cli import main

main()
