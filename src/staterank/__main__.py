from staterank.cli import main

raise SystemExit(main())
