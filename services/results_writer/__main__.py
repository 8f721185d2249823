from services.results_writer.service import main

main()
