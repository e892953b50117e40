"""Writes data/function_calling.jsonl: r3's own small function-calling set in
the xLAM/APIGen form (query, tools and answers; the last two JSON strings).
Deterministic; rerun after editing the tables below."""
import json
import pathlib

T = {
    "get_weather": {"description": "Current weather for a city.", "parameters": {
        "city": {"type": "str", "description": "City name, e.g. 'Lisbon'."},
        "unit": {"type": "str, optional", "description": "'celsius' or 'fahrenheit'.", "default": "celsius"}}},
    "convert_currency": {"description": "Convert an amount between currencies.", "parameters": {
        "amount": {"type": "float", "description": "Amount to convert."},
        "from_currency": {"type": "str", "description": "ISO code to convert from."},
        "to_currency": {"type": "str", "description": "ISO code to convert to."}}},
    "calculate_bmi": {"description": "Body-mass index from weight and height.", "parameters": {
        "weight_kg": {"type": "float", "description": "Weight in kilograms."},
        "height_m": {"type": "float", "description": "Height in metres."}}},
    "search_books": {"description": "Search a library catalogue.", "parameters": {
        "query": {"type": "str", "description": "Words to search for."},
        "max_results": {"type": "int, optional", "description": "How many results.", "default": 10},
        "filters": {"type": "dict, optional", "description": "Field filters, e.g. {'language': 'en'}.", "default": {}}}},
    "send_email": {"description": "Send an e-mail.", "parameters": {
        "to": {"type": "List[str]", "description": "Recipient addresses."},
        "subject": {"type": "str", "description": "Subject line."},
        "body": {"type": "str", "description": "Message text."}}},
    "create_event": {"description": "Add an event to the calendar.", "parameters": {
        "title": {"type": "str", "description": "Event title."},
        "date": {"type": "str", "description": "Date as YYYY-MM-DD."},
        "duration_minutes": {"type": "int, optional", "description": "Length in minutes.", "default": 60},
        "attendees": {"type": "List[str], optional", "description": "People invited.", "default": []}}},
    "is_prime": {"description": "Check whether an integer is prime.", "parameters": {
        "n": {"type": "int", "description": "The integer to check."}}},
    "fibonacci": {"description": "The n-th Fibonacci number.", "parameters": {
        "n": {"type": "int", "description": "Index, starting at 0."}}},
    "sort_numbers": {"description": "Sort a list of numbers.", "parameters": {
        "numbers": {"type": "List[float]", "description": "Numbers to sort."},
        "descending": {"type": "bool, optional", "description": "Largest first.", "default": False}}},
    "word_count": {"description": "Count the words in a text.", "parameters": {
        "text": {"type": "str", "description": "The text."}}},
    "translate_text": {"description": "Translate text into another language.", "parameters": {
        "text": {"type": "str", "description": "Text to translate."},
        "target_language": {"type": "str", "description": "ISO 639-1 code, e.g. 'de'."},
        "formal": {"type": "bool, optional", "description": "Use formal register.", "default": False}}},
    "get_stock_price": {"description": "Latest price of a stock.", "parameters": {
        "symbol": {"type": "str", "description": "Ticker symbol."},
        "exchange": {"type": "str, optional", "description": "Exchange code.", "default": "NASDAQ"}}},
    "compound_interest": {"description": "Final balance with compound interest.", "parameters": {
        "principal": {"type": "float", "description": "Initial amount."},
        "rate": {"type": "float", "description": "Annual rate as a fraction, e.g. 0.05."},
        "years": {"type": "int", "description": "Number of years."},
        "compounds_per_year": {"type": "int, optional", "description": "Compounding periods per year.", "default": 1}}},
    "find_restaurants": {"description": "Find restaurants near a place.", "parameters": {
        "location": {"type": "str", "description": "Where to search."},
        "cuisine": {"type": "str, optional", "description": "Kind of food.", "default": "any"},
        "price_range": {"type": "List[int], optional", "description": "Min and max price level, 1-4.", "default": [1, 4]}}},
    "set_reminder": {"description": "Set a reminder.", "parameters": {
        "message": {"type": "str", "description": "What to remind about."},
        "time": {"type": "str", "description": "Time as HH:MM, 24-hour clock."}}},
    "get_distance": {"description": "Road distance between two cities.", "parameters": {
        "origin": {"type": "str", "description": "Start city."},
        "destination": {"type": "str", "description": "End city."},
        "unit": {"type": "str, optional", "description": "'km' or 'mi'.", "default": "km"}}},
    "create_user": {"description": "Create an account.", "parameters": {
        "username": {"type": "str", "description": "Login name."},
        "profile": {"type": "dict", "description": "Profile with 'name', 'age' and 'interests'."}}},
    "gcd": {"description": "Greatest common divisor of two integers.", "parameters": {
        "a": {"type": "int", "description": "First integer."},
        "b": {"type": "int", "description": "Second integer."}}},
}

def tool(name):
    return {"name": name, **T[name]}

def call(name, **arguments):
    return {"name": name, "arguments": arguments}

# (query, tools offered, expected calls)
R = [
    ("What's the weather like in Lisbon right now?", ["get_weather", "get_distance"], [call("get_weather", city="Lisbon")]),
    ("Tell me the temperature in Chicago in fahrenheit.", ["get_weather"], [call("get_weather", city="Chicago", unit="fahrenheit")]),
    ("Weather in Oslo and in Cairo, please.", ["get_weather", "find_restaurants"], [call("get_weather", city="Oslo"), call("get_weather", city="Cairo")]),
    ("How hot is it in Phoenix? Give it in celsius.", ["get_weather"], [call("get_weather", city="Phoenix")]),
    ("Convert 250 US dollars to euros.", ["convert_currency", "get_stock_price"], [call("convert_currency", amount=250, from_currency="USD", to_currency="EUR")]),
    ("How many yen is 19.99 GBP?", ["convert_currency"], [call("convert_currency", amount=19.99, from_currency="GBP", to_currency="JPY")]),
    ("Convert 100 CHF to both USD and EUR.", ["convert_currency"], [call("convert_currency", amount=100, from_currency="CHF", to_currency="USD"), call("convert_currency", amount=100, from_currency="CHF", to_currency="EUR")]),
    ("My weight is 70 kg and I am 1.75 m tall. What's my BMI?", ["calculate_bmi", "word_count"], [call("calculate_bmi", weight_kg=70, height_m=1.75)]),
    ("Compute the BMI for someone who is 1.6 metres and weighs 52.5 kg.", ["calculate_bmi"], [call("calculate_bmi", weight_kg=52.5, height_m=1.6)]),
    ("Find books about sourdough baking.", ["search_books", "translate_text"], [call("search_books", query="sourdough baking")]),
    ("Search the catalogue for 'graph theory', only 3 results.", ["search_books"], [call("search_books", query="graph theory", max_results=3)]),
    ("Look for French-language books on cheese, at most 5.", ["search_books"], [call("search_books", query="cheese", max_results=5, filters={"language": "fr"})]),
    ("Find books on climate published after 2015 in English.", ["search_books"], [call("search_books", query="climate", filters={"language": "en", "published_after": 2015})]),
    ("Email ana@example.com with subject 'Lunch' saying 'Noon at the usual place?'", ["send_email", "set_reminder"], [call("send_email", to=["ana@example.com"], subject="Lunch", body="Noon at the usual place?")]),
    ("Send 'The build is green.' to dev@example.org and qa@example.org, subject 'CI'.", ["send_email"], [call("send_email", to=["dev@example.org", "qa@example.org"], subject="CI", body="The build is green.")]),
    ("Put 'Dentist' on my calendar for 2026-03-14.", ["create_event", "set_reminder"], [call("create_event", title="Dentist", date="2026-03-14")]),
    ("Schedule a 30 minute 'Standup' on 2026-01-05 with Kim and Lee.", ["create_event"], [call("create_event", title="Standup", date="2026-01-05", duration_minutes=30, attendees=["Kim", "Lee"])]),
    ("Create a two-hour event 'Workshop' on 2026-06-01.", ["create_event"], [call("create_event", title="Workshop", date="2026-06-01", duration_minutes=120)]),
    ("Is 97 a prime number?", ["is_prime", "gcd"], [call("is_prime", n=97)]),
    ("Check whether 91 and 89 are prime.", ["is_prime"], [call("is_prime", n=91), call("is_prime", n=89)]),
    ("Is 1 prime?", ["is_prime", "fibonacci"], [call("is_prime", n=1)]),
    ("What is the 20th Fibonacci number (starting from index 0)?", ["fibonacci", "is_prime"], [call("fibonacci", n=20)]),
    ("Give me Fibonacci numbers 10, 11 and 12.", ["fibonacci"], [call("fibonacci", n=10), call("fibonacci", n=11), call("fibonacci", n=12)]),
    ("Sort these: 5, 3.2, 9, -1.", ["sort_numbers", "word_count"], [call("sort_numbers", numbers=[5, 3.2, 9, -1])]),
    ("Sort 4, 8, 15, 16, 23, 42 from largest to smallest.", ["sort_numbers"], [call("sort_numbers", numbers=[4, 8, 15, 16, 23, 42], descending=True)]),
    ("Sort 10, 2, 33 in ascending order.", ["sort_numbers"], [call("sort_numbers", numbers=[10, 2, 33])]),
    ("How many words are in 'the quick brown fox jumps'?", ["word_count", "translate_text"], [call("word_count", text="the quick brown fox jumps")]),
    ("Count words in 'To be, or not to be' and in 'Hello world'.", ["word_count"], [call("word_count", text="To be, or not to be"), call("word_count", text="Hello world")]),
    ("Translate 'Where is the station?' into German.", ["translate_text", "get_distance"], [call("translate_text", text="Where is the station?", target_language="de")]),
    ("Translate 'Could you help me?' into French, formal register.", ["translate_text"], [call("translate_text", text="Could you help me?", target_language="fr", formal=True)]),
    ("Say 'good morning' in Spanish and in Italian.", ["translate_text"], [call("translate_text", text="good morning", target_language="es"), call("translate_text", text="good morning", target_language="it")]),
    ("What's Apple trading at?", ["get_stock_price", "convert_currency"], [call("get_stock_price", symbol="AAPL")]),
    ("Price of SAP on the XETRA exchange?", ["get_stock_price"], [call("get_stock_price", symbol="SAP", exchange="XETRA")]),
    ("Get prices for MSFT and NVDA.", ["get_stock_price"], [call("get_stock_price", symbol="MSFT"), call("get_stock_price", symbol="NVDA")]),
    ("If I invest 1000 at 5% for 10 years, compounded yearly, what do I get?", ["compound_interest", "convert_currency"], [call("compound_interest", principal=1000, rate=0.05, years=10)]),
    ("Balance of 2500 after 3 years at 4% compounded monthly?", ["compound_interest"], [call("compound_interest", principal=2500, rate=0.04, years=3, compounds_per_year=12)]),
    ("Compare 500 at 3% for 5 years compounded quarterly versus yearly.", ["compound_interest"], [call("compound_interest", principal=500, rate=0.03, years=5, compounds_per_year=4), call("compound_interest", principal=500, rate=0.03, years=5)]),
    ("Find restaurants near Shibuya.", ["find_restaurants", "get_weather"], [call("find_restaurants", location="Shibuya")]),
    ("Cheap Thai food near Camden, price level 1 to 2.", ["find_restaurants"], [call("find_restaurants", location="Camden", cuisine="thai", price_range=[1, 2])]),
    ("Any Italian restaurants around Brooklyn?", ["find_restaurants"], [call("find_restaurants", location="Brooklyn", cuisine="italian")]),
    ("Remind me to call mum at 18:30.", ["set_reminder", "create_event"], [call("set_reminder", message="call mum", time="18:30")]),
    ("Set reminders: 'stretch' at 10:00 and 'drink water' at 15:00.", ["set_reminder"], [call("set_reminder", message="stretch", time="10:00"), call("set_reminder", message="drink water", time="15:00")]),
    ("How far is Madrid from Barcelona?", ["get_distance", "get_weather"], [call("get_distance", origin="Madrid", destination="Barcelona")]),
    ("Distance from Boston to New York in miles.", ["get_distance"], [call("get_distance", origin="Boston", destination="New York", unit="mi")]),
    ("How far are Paris to Lyon and Lyon to Marseille?", ["get_distance"], [call("get_distance", origin="Paris", destination="Lyon"), call("get_distance", origin="Lyon", destination="Marseille")]),
    ("Create user 'jdoe' for John Doe, 34, into chess and hiking.", ["create_user", "send_email"], [call("create_user", username="jdoe", profile={"name": "John Doe", "age": 34, "interests": ["chess", "hiking"]})]),
    ("Sign up 'mira' (Mira Patel, age 27, interests: painting).", ["create_user"], [call("create_user", username="mira", profile={"name": "Mira Patel", "age": 27, "interests": ["painting"]})]),
    ("What is the greatest common divisor of 84 and 36?", ["gcd", "is_prime"], [call("gcd", a=84, b=36)]),
    ("GCD of 17 and 5, and of 100 and 75?", ["gcd"], [call("gcd", a=17, b=5), call("gcd", a=100, b=75)]),
    ("Check the weather in Reykjavik and convert 50 EUR to ISK.", ["get_weather", "convert_currency"], [call("get_weather", city="Reykjavik"), call("convert_currency", amount=50, from_currency="EUR", to_currency="ISK")]),
    ("Is 7919 prime, and what is Fibonacci number 15?", ["is_prime", "fibonacci"], [call("is_prime", n=7919), call("fibonacci", n=15)]),
    ("Remind me at 07:45 to 'take the train' and put 'Trip' on 2026-05-02 for 8 hours.", ["set_reminder", "create_event"], [call("set_reminder", message="take the train", time="07:45"), call("create_event", title="Trip", date="2026-05-02", duration_minutes=480)]),
    ("Translate 'thank you' to Japanese and count the words in 'thank you very much'.", ["translate_text", "word_count"], [call("translate_text", text="thank you", target_language="ja"), call("word_count", text="thank you very much")]),
    ("Find vegan places near Kreuzberg and tell me the weather in Berlin.", ["find_restaurants", "get_weather"], [call("find_restaurants", location="Kreuzberg", cuisine="vegan"), call("get_weather", city="Berlin")]),
    ("Sort 3, 1, 2 and also 9, 7, 8 descending.", ["sort_numbers"], [call("sort_numbers", numbers=[3, 1, 2]), call("sort_numbers", numbers=[9, 7, 8], descending=True)]),
    ("Email team@example.com subject 'Offsite' body 'See calendar', and add 'Offsite' on 2026-09-10 with Ana.", ["send_email", "create_event"], [call("send_email", to=["team@example.com"], subject="Offsite", body="See calendar"), call("create_event", title="Offsite", date="2026-09-10", attendees=["Ana"])]),
    ("What's TSLA at, and convert 1000 USD to CAD.", ["get_stock_price", "convert_currency"], [call("get_stock_price", symbol="TSLA"), call("convert_currency", amount=1000, from_currency="USD", to_currency="CAD")]),
    ("Find 2 books on Rust programming.", ["search_books"], [call("search_books", query="Rust programming", max_results=2)]),
    ("What's the weather in Nairobi? Use fahrenheit.", ["get_weather", "get_distance"], [call("get_weather", city="Nairobi", unit="fahrenheit")]),
    ("Compute BMI for 90 kg at 1.9 m and for 60 kg at 1.65 m.", ["calculate_bmi"], [call("calculate_bmi", weight_kg=90, height_m=1.9), call("calculate_bmi", weight_kg=60, height_m=1.65)]),
    ("Create user 'kai' with profile name Kai Müller, age 41, interests sailing and jazz.", ["create_user"], [call("create_user", username="kai", profile={"name": "Kai Müller", "age": 41, "interests": ["sailing", "jazz"]})]),
    ("How far is Rome from Naples in km?", ["get_distance"], [call("get_distance", origin="Rome", destination="Naples")]),
    ("Look up books matching 'origami' with filters: language en, format paperback.", ["search_books"], [call("search_books", query="origami", filters={"language": "en", "format": "paperback"})]),
    ("Is 2 prime? And is 4?", ["is_prime"], [call("is_prime", n=2), call("is_prime", n=4)]),
]

out = pathlib.Path(__file__).resolve().parent.parent / "data" / "function_calling.jsonl"
with out.open("w") as f:
    for i, (query, tools, answers) in enumerate(R):
        for c in answers:
            assert set(c["arguments"]) <= set(T[c["name"]]["parameters"]), (query, c)
        record = {"id": i, "query": query, "tools": json.dumps([tool(t) for t in tools]), "answers": json.dumps(answers)}
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
print(f"wrote {len(R)} records over {len(T)} tools to {out}")
