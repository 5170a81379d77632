"""The built-in data set: synthetic dialogues and summaries in the DialogSum format.

It is the offline default for fine-tuning, so it is generated here, deterministically and without
the network, from the tables below. It has to serve a tiny randomly initialised model with a BPE
vocabulary of one or two thousand tokens, which sets its shape:

* few distinct words (a few hundred), so a small vocabulary covers the corpus;
* short dialogues (4 to 14 turns, about 40 to 200 words) and one- or two-sentence summaries;
* enough that an adapter can learn it in a few hundred steps, yet not so little that it can be
  learned by rote. A single templated domain was solved perfectly (ROUGE-L 100), so there are
  twelve domains, each summary copies slot values (names, days, times, places, amounts) that
  only the dialogue gives, filler turns that the summary ignores are mixed in, turns come in
  several phrasings and orders, and each domain has several summary phrasings chosen at random,
  so no model can match the single reference word for word every time.

Templates use ``A:``/``B:`` for the two roles of a domain (say customer and waiter); whichever
role speaks first becomes ``#Person1#``. Summaries name a role ``{A}``/``{B}``, rendered as its
``#PersonN#`` tag or, when the dialogue mentioned the person's name, sometimes as that name,
as DialogSum does. Every summary is chosen among those whose slots the dialogue mentioned.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

#: One turn template: ``"A: text"`` or ``"B: text"``.
Variant = tuple[str, ...]
#: A slot's pool: plain values, or groups of related values chosen together (an outcome and how
#: the summary words it).
Pool = Union[tuple[str, ...], tuple[dict[str, str], ...]]

SPLIT_NAMES = ("train", "validation", "test")
MIN_SPLIT_SIZE = 10
MIN_TURNS, MAX_TURNS = 4, 14
MIN_DIALOGUE_WORDS, MAX_DIALOGUE_WORDS = 40, 200
MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 10, 35

#: Share of dialogues that use a domain's short all-in-one exchange, for the short end of lengths.
QUICK_SHARE = 0.2
#: Chance that an optional step is in a dialogue.
OPTIONAL_STEP_SHARE = 0.6
#: Chance that a summary calls a person by the name the dialogue gave, rather than #PersonN#.
NAME_IN_SUMMARY_SHARE = 0.6
#: Attempts at a row before giving up; a row is redrawn when it is too long, too short or a repeat.
MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class Step:
    """One informative exchange of a domain, in one of several phrasings."""

    variants: tuple[Variant, ...]
    #: Movable steps trade places with each other, so the order of information varies.
    movable: bool = True
    #: Optional steps are left out of some dialogues; summaries that need their slots then are not used.
    optional: bool = False


@dataclass(frozen=True)
class Domain:
    """Everything needed to write dialogues and summaries on one topic."""

    topic: str
    slots: Mapping[str, Pool]
    openings: tuple[Variant, ...]
    steps: tuple[Step, ...]
    closings: tuple[Variant, ...]
    summaries: tuple[str, ...]
    #: On-topic chatter that no summary mentions.
    details: tuple[Variant, ...]
    small_talk: tuple[Variant, ...]
    #: Whole short conversations that replace the opening and the steps.
    quick: tuple[Variant, ...] = field(default=())


def _step(*variants: Variant, movable: bool = True, optional: bool = False) -> Step:
    return Step(variants=variants, movable=movable, optional=optional)


# --- Shared pools --------------------------------------------------------------------------------

NAMES = (
    "Tom", "Anna", "Jack", "Lucy", "Mike", "Sara", "David", "Emma",
    "Peter", "Linda", "Sam", "Kate", "Ben", "Julia", "Paul", "Helen",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EVENING_TIMES = ("6:00", "6:30", "7:00", "7:30", "8:00", "8:30")
DAY_TIMES = ("9:00", "9:30", "10:00", "11:30", "1:00", "2:30", "3:00", "4:30")
PRICES = ("$25", "$40", "$55", "$80", "$120", "$150")

COMMON_SMALL_TALK: tuple[Variant, ...] = (
    ("A: It is so cold outside today.", "B: Yes, it is. I hope it gets warmer soon."),
    ("B: You look a bit tired.", "A: I did not sleep well last night."),
    ("A: Sorry, my phone is ringing. One moment.", "B: Take your time."),
)
SERVICE_SMALL_TALK: tuple[Variant, ...] = COMMON_SMALL_TALK + (
    ("B: Sorry to keep you waiting.", "A: That is OK. It is very busy today."),
    ("B: Is this your first time here?", "A: Yes, a friend told me about you."),
    ("A: Hold on, let me find a pen.", "B: Sure, no hurry."),
)
FRIENDS_SMALL_TALK: tuple[Variant, ...] = COMMON_SMALL_TALK + (
    ("A: By the way, how is your new job?", "B: Busy, but I like it."),
    ("B: Did you see the game last night?", "A: No, I missed it. Who won?", "B: Our team, of course."),
    ("B: How is your sister doing?", "A: She is fine, thanks for asking."),
)


# --- Domains ------------------------------------------------------------------------------------

BOOK_A_TABLE = Domain(
    topic="book a table",
    slots={
        "a_name": NAMES,
        "restaurant": ("Rosa's", "Luigi's", "Golden Duck", "Blue Moon", "Red Lantern", "Green Garden"),
        "size": ("two", "three", "four", "five", "six", "eight"),
        "day": DAYS,
        "time": EVENING_TIMES,
        # Asked for first and not free, so the summary must keep the time finally agreed.
        "first_time": EVENING_TIMES,
        "request": ("a table by the window", "a quiet corner", "a high chair for a baby",
                    "a small birthday cake", "a table outside"),
    },
    openings=(
        ("B: Good evening, {restaurant}. How can I help you?", "A: Hi, I would like to book a table, please."),
        ("A: Hello, is this {restaurant}?", "B: Yes, it is. What can I do for you?",
         "A: I want to reserve a table."),
        ("B: Thank you for calling {restaurant}.", "A: Hello. Can I make a reservation for dinner?"),
    ),
    steps=(
        _step(
            ("B: How many people will there be?", "A: There will be {size} of us."),
            ("A: We are a group of {size}.", "B: All right, a table for {size}."),
            ("B: For how many?", "A: For {size}, please."),
        ),
        _step(
            ("B: For which day?", "A: This {day}, at {time} if possible.", "B: Let me check. Yes, {time} is fine."),
            ("A: Do you have a free table on {day} at {first_time}?",
             "B: Sorry, we are full at {first_time}. How about {time}?", "A: {time} is fine."),
            ("A: We would like to come on {day} evening.", "B: What time?", "A: Around {time}.",
             "B: OK, {day} at {time}."),
            ("A: Can we come on {day} at {first_time}?",
             "B: I am afraid {first_time} is taken, but we have a table at {time}.",
             "A: OK, we will take {time} then."),
        ),
        _step(
            ("B: Can I have your name, please?", "A: It is {a_name}."),
            ("B: What name is it under?", "A: {a_name}, please."),
            ("A: My name is {a_name}, by the way.", "B: Thank you, {a_name}."),
            optional=True,
        ),
        _step(
            ("A: Could we have {request}?", "B: Sure, I will make a note of that."),
            ("B: Anything else?", "A: Yes, we would like {request}.", "B: No problem."),
            movable=False,
            optional=True,
        ),
    ),
    closings=(
        ("B: We look forward to seeing you.", "A: Thank you. Goodbye."),
        ("A: Great, thanks a lot. Bye.",),
        ("B: Your table is booked. See you on {day}.", "A: Thanks, see you then."),
    ),
    summaries=(
        "{A} books a table for {size} at {restaurant} on {day} at {time}.",
        "{A} calls {restaurant} to reserve a table for {size} people on {day} at {time} and asks for {request}.",
        "{A} makes a reservation at {restaurant} for {day} at {time}. {A} also wants {request}.",
        "{A} reserves a table at {restaurant} for {size} people at {time} on {day}.",
        "{B} helps {A} book a table for {size} on {day}, and {A} gets {time} instead of {first_time}.",
    ),
    details=(
        ("A: Do you have parking?", "B: Yes, there is a car park behind the building."),
        ("A: Is there a dress code?", "B: No, you can come as you are."),
        ("A: Do you have food for people who do not eat meat?", "B: Yes, we have several dishes."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("A: Hi, I would like a table for {size} at {restaurant} on {day} at {time}.",
         "B: Sure. What name is it under?", "A: {a_name}.", "B: Thank you, {a_name}. It is booked."),
        ("B: Good evening, {restaurant}.",
         "A: Hello, this is {a_name}. Can I book a table for {size} this {day} at {time}?",
         "B: Yes, that is fine. We will see you then."),
    ),
)

SEE_A_DOCTOR = Domain(
    topic="see a doctor",
    slots={
        "a_name": NAMES,
        "b_name": ("Dr. Green", "Dr. Brown", "Dr. Wang", "Dr. Miller", "Dr. White"),
        "symptom": ("a headache", "a sore throat", "a bad cough", "a fever", "back pain", "a stomach ache"),
        "duration": ("two days", "three days", "four days", "a week", "two weeks"),
        "advice": ("rest at home", "drink more water", "take some medicine twice a day", "stay in bed",
                   "avoid cold drinks"),
        "day": DAYS,
    },
    openings=(
        ("B: Good morning. What seems to be the problem?",),
        ("A: Good morning, {b_name}.", "B: Good morning. Please sit down. How can I help you?"),
        ("B: Hello, come in. What brings you here today?",),
    ),
    steps=(
        _step(
            ("A: I have had {symptom} for {duration}.", "B: I see."),
            ("A: I am not feeling well. I have {symptom}.", "B: How long have you had it?", "A: For about {duration}."),
            ("A: I have got {symptom}, and it started {duration} ago.", "B: That is not nice."),
            movable=False,
        ),
        _step(
            ("B: Can I have your name for the record?", "A: Yes, it is {a_name}."),
            ("B: You are {a_name}, right?", "A: Yes, that is me."),
            optional=True,
        ),
        _step(
            ("B: Let me take a look. Open your mouth, please.", "A: Is it serious?", "B: No, it is nothing serious."),
            ("B: Let me check your temperature.", "A: Is it bad?", "B: It is a little high, but you will be fine."),
            movable=False,
        ),
        _step(
            ("B: I want you to {advice}.", "A: All right, I will."),
            ("B: You should {advice} for a few days.", "A: OK, doctor."),
            ("A: What should I do?", "B: Just {advice}."),
            movable=False,
        ),
        _step(
            ("B: Come back on {day} if you do not feel better.", "A: I will. Thank you."),
            ("B: I would like to see you again on {day}.", "A: Fine, I will make an appointment."),
            movable=False,
            optional=True,
        ),
    ),
    closings=(
        ("A: Goodbye, doctor.", "B: Goodbye. Get well soon."),
        ("B: Take care.",),
    ),
    summaries=(
        "{A} has had {symptom} for {duration}. {B} tells {A} to {advice} and come back on {day}.",
        "{A} sees the doctor about {symptom}. The doctor advises {A} to {advice}.",
        "{A} has {symptom} and is told to {advice} and return on {day}.",
        "The doctor examines {A}, who has had {symptom} for {duration}, and asks {A} to {advice}.",
        "{B} tells {A}, who has {symptom}, to {advice}.",
    ),
    details=(
        ("B: Do you have any allergies?", "A: No, not that I know of."),
        ("B: Have you been sleeping well?", "A: Not really."),
        ("B: Are you taking any medicine now?", "A: No, nothing."),
        ("B: Do you smoke?", "A: No, I never have."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("B: Good morning. What is the problem?", "A: I have had {symptom} for {duration}.",
         "B: It is nothing serious. Just {advice}.", "A: Thank you, doctor."),
        ("A: Good morning, {b_name}. I have {symptom}.", "B: How long have you had it?", "A: About {duration}.",
         "B: Please {advice} and come back on {day}."),
    ),
)

RETURN_GOODS = Domain(
    topic="return goods",
    slots={
        "item": ("jacket", "pair of shoes", "lamp", "kettle", "blue shirt", "phone case", "coffee maker", "backpack"),
        "problem": ("it is too small", "it is broken", "the color is wrong", "it does not work", "it has a hole in it"),
        "bought_day": DAYS,
        "price": PRICES,
        "outcome": ("a refund", "a new one", "store credit", "a bigger size"),
    },
    openings=(
        ("B: Hello, can I help you?",
         "A: Yes, I bought this {item} here on {bought_day}, and I would like to return it."),
        ("A: Excuse me, I want to return this {item}.", "B: Sure. When did you buy it?", "A: Last {bought_day}."),
        ("B: Next, please.", "A: Hi. I need to bring back this {item}. I got it on {bought_day}."),
    ),
    steps=(
        _step(
            ("B: What is wrong with it?", "A: Well, {problem}."),
            ("A: The problem is that {problem}.", "B: I am sorry to hear that."),
            ("B: Is there a problem with it?", "A: Yes, {problem}."),
            movable=False,
        ),
        _step(
            ("B: Do you have the receipt?", "A: Yes, here it is. It was {price}."),
            ("A: Here is my receipt. I paid {price}.", "B: Thank you."),
            optional=True,
        ),
        _step(
            ("B: What would you like us to do?", "A: I would like {outcome}, please.", "B: No problem."),
            ("A: Can I get {outcome}?", "B: Yes, of course. Let me do that for you."),
            ("B: We can give you {outcome}.", "A: That would be great."),
        ),
    ),
    closings=(
        ("A: Thanks for your help.", "B: You are welcome. Have a nice day."),
        ("B: Here you are. Anything else?", "A: No, that is all. Thanks."),
    ),
    summaries=(
        "{A} returns the {item} bought on {bought_day} because {problem} and gets {outcome}.",
        "{A} wants to return a {item} that cost {price}. {B} gives {A} {outcome}.",
        "{A} brings back the {item} since {problem}, and {B} agrees to give {A} {outcome}.",
        "{A} returns a {item} for {price} and asks for {outcome}.",
    ),
    details=(
        ("B: Was it a gift?", "A: No, I bought it for myself."),
        ("A: Is the shop open on Sundays?", "B: Yes, from ten to five."),
        ("B: Did you use it at all?", "A: Only once."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("A: Hi, I got this {item} on {bought_day}, but {problem}.", "B: I am sorry. Would you like {outcome}?",
         "A: Yes, please."),
    ),
)

BOOK_A_FLIGHT = Domain(
    topic="book a flight",
    slots={
        "a_name": NAMES,
        "city": ("Paris", "London", "Rome", "Tokyo", "Berlin", "Madrid", "Sydney", "Boston"),
        "day": DAYS,
        "time": DAY_TIMES,
        # The flight not taken, so the time in the summary has to be read, not guessed.
        "first_time": DAY_TIMES,
        "price": ("$120", "$180", "$250", "$300", "$420"),
        "seat": ("a window seat", "an aisle seat"),
        "bags": ("one bag", "two bags", "three bags"),
    },
    openings=(
        ("B: Good morning, Sky Travel. How may I help you?", "A: I need a flight to {city}."),
        ("A: Hello, I would like to book a flight to {city}.", "B: Certainly."),
        ("A: Hi, are there any flights to {city} this week?", "B: Let me see."),
    ),
    steps=(
        _step(
            ("B: When do you want to leave?", "A: On {day}, please.", "B: There is a flight at {time}.",
             "A: That is fine."),
            ("A: I want to fly on {day}.", "B: We have a flight at {first_time} and one at {time}.",
             "A: I will take the one at {time}."),
            ("B: There is a flight on {day} at {time}.", "A: Perfect, I will take it."),
            movable=False,
        ),
        _step(
            ("A: How much is it?", "B: It is {price} one way."),
            ("B: The ticket costs {price}.", "A: That is OK."),
        ),
        _step(
            ("B: Would you like a window seat or an aisle seat?", "A: I would like {seat}, please."),
            ("A: Can I have {seat}?", "B: Sure, that is done."),
            optional=True,
        ),
        _step(
            ("B: How many bags will you check in?", "A: I will have {bags}."),
            ("A: I am taking {bags}. Is that OK?", "B: Yes, that is fine."),
            optional=True,
        ),
        _step(
            ("B: May I have your full name?", "A: {a_name} Smith."),
            ("A: The ticket is for me, {a_name} Brown.", "B: Thank you."),
            optional=True,
        ),
    ),
    closings=(
        ("B: Your ticket is booked. Have a good trip.", "A: Thank you very much."),
        ("A: Thanks for your help.", "B: You are welcome."),
    ),
    summaries=(
        "{A} books a flight to {city} on {day} at {time} for {price}.",
        "{A} buys a ticket to {city}. The flight leaves on {day} at {time}, and {A} asks for {seat}.",
        "{A} will fly to {city} on {day}. {B} helps {A} book {seat} for {price}.",
        "{A} books {seat} on the {time} flight to {city} on {day}.",
        "{A} books a {price} flight to {city} on {day} and will check in {bags}.",
    ),
    details=(
        ("A: Is there food on the plane?", "B: Yes, lunch is included."),
        ("A: How long is the flight?", "B: A little over three hours."),
        ("B: Do you need a hotel as well?", "A: No, I will stay with a friend."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("A: I need a flight to {city} on {day}.", "B: There is one at {time} for {price}.",
         "A: Great, I will take it."),
    ),
)

BOOK_A_ROOM = Domain(
    topic="book a room",
    slots={
        "a_name": NAMES,
        "hotel": ("the Park Hotel", "the Grand Hotel", "the Sea View Hotel", "the City Inn"),
        "room": ("a single room", "a double room", "a family room", "a quiet room"),
        "nights": ("one night", "two nights", "three nights", "four nights", "a week"),
        "day": DAYS,
        "price": ("$70", "$90", "$110", "$150"),
    },
    openings=(
        ("B: Good afternoon, this is {hotel}.", "A: Hi, I want to book a room."),
        ("A: Hello, is that {hotel}? I would like to make a booking.", "B: Yes, of course."),
        ("A: Hello, do you have any rooms free from {day}?", "B: Let me check. Yes, we do."),
    ),
    steps=(
        _step(
            ("B: What kind of room would you like?", "A: I would like {room}."),
            ("A: I need {room}.", "B: We have one left."),
        ),
        _step(
            ("B: How long will you stay?", "A: For {nights}, from {day}."),
            ("A: I will arrive on {day} and stay {nights}.", "B: Very good."),
        ),
        _step(
            ("A: What is the rate?", "B: It is {price} a night."),
            ("B: That will be {price} per night.", "A: Fine."),
            optional=True,
        ),
        _step(
            ("B: Can I have your name, please?", "A: Yes, it is {a_name} White."),
            ("A: The booking is for {a_name} Green.", "B: Thank you."),
            optional=True,
        ),
    ),
    closings=(
        ("B: Your room is booked. See you on {day}.", "A: Thank you."),
        ("A: That is all. Thanks.", "B: You are welcome. Goodbye."),
    ),
    summaries=(
        "{A} books {room} at {hotel} for {nights} from {day}.",
        "{A} reserves {room} for {nights}, arriving on {day}. It costs {price} a night.",
        "{B} helps {A} book {room} at {price} a night for {nights}.",
        "{A} calls {hotel} and books {room} from {day} for {nights}.",
    ),
    details=(
        ("A: Is breakfast included?", "B: Yes, from seven to ten."),
        ("A: Do you have free parking?", "B: Yes, for all our guests."),
        ("A: Is there a pool?", "B: Yes, it is open until ten."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("A: Hello, I need {room} for {nights} from {day}.", "B: No problem. It is {price} a night.",
         "A: Great, please book it."),
    ),
)

JOB_INTERVIEW = Domain(
    topic="job interview",
    slots={
        "b_name": NAMES,
        "position": ("sales assistant", "cashier", "driver", "cook", "bank clerk", "teacher", "nurse", "waiter"),
        "years": ("one year", "two years", "three years", "five years"),
        "last_job": ("a small hotel", "a big shop", "a bakery", "a school", "a hospital"),
        "salary": ("$1,800", "$2,000", "$2,500", "$3,000"),
        "day": DAYS,
        # The outcome changes both the last exchange and how the summary words it.
        "result": (
            {"result": "We will call you on {day}.", "result_reply": "Thank you very much.",
             "result_s": "will call {B} on {day}"},
            {"result": "You can start on {day}.", "result_reply": "Wonderful, thank you!",
             "result_s": "offers {B} the job starting on {day}"},
            {"result": "We need a few days to decide. We will email you by {day}.",
             "result_reply": "I look forward to it.",
             "result_s": "will email {B} by {day}"},
        ),
    },
    openings=(
        ("A: Good morning. Please have a seat. You are {b_name}, right?", "B: Yes, I am here for the {position} job."),
        ("B: Good morning. My name is {b_name}. I am here for the interview.",
         "A: Welcome. So you want to be a {position}?", "B: Yes, that is right."),
        ("A: Thank you for coming, {b_name}. Tell me why you want to work as a {position}.",
         "B: I have always liked this kind of work."),
    ),
    steps=(
        _step(
            ("A: Do you have any experience?", "B: Yes, I worked at {last_job} for {years}."),
            ("B: I have {years} of experience.", "A: Where did you work?", "B: At {last_job}."),
            ("A: Where did you work before?", "B: At {last_job}, for {years}."),
        ),
        _step(
            ("A: What salary do you expect?", "B: About {salary} a month."),
            ("B: What is the pay like?", "A: What do you expect?", "B: I hope for {salary} a month."),
            optional=True,
        ),
        _step(
            ("A: {result}", "B: {result_reply}"),
            movable=False,
        ),
    ),
    closings=(
        ("B: Thank you for your time.",),
        ("A: It was nice to meet you.", "B: Nice to meet you too."),
    ),
    summaries=(
        "{A} interviews {B} for the {position} job. {B} has worked at {last_job} for {years}.",
        "{B} applies to be a {position} and tells {A} about {years} of work at {last_job}. {A} {result_s}.",
        "{B} has an interview for a {position} position and hopes for {salary} a month.",
        "{A} asks {B} about work at {last_job} and {result_s}.",
        "After the interview for the {position} job, {A} {result_s}.",
    ),
    details=(
        ("A: What are your strengths?", "B: I learn fast and I am good with people."),
        ("A: Why did you leave your last job?", "B: I want to learn new things."),
        ("A: Do you have any questions for us?", "B: Yes, how big is the team?", "A: About ten people."),
    ),
    small_talk=SERVICE_SMALL_TALK,
)

RENT_A_FLAT = Domain(
    topic="rent an apartment",
    slots={
        "rooms": ("a one-bedroom flat", "a two-bedroom flat", "a small studio", "a three-bedroom flat"),
        "area": ("near the park", "downtown", "by the river", "close to the station"),
        "rent": ("$600", "$750", "$900", "$1,200"),
        "month": ("May", "June", "July", "August", "September"),
        "pet": ("a cat", "a small dog", "two cats"),
    },
    openings=(
        ("A: Hello, I am calling about the flat {area}.", "B: Yes, it is still free."),
        ("B: Hi, are you here to see the flat?", "A: Yes, I saw the ad for {rooms} {area}."),
        ("A: Hi, I am looking for a place {area}.", "B: You are lucky. I have one free."),
    ),
    steps=(
        _step(
            ("A: How big is it?", "B: It is {rooms}."),
            ("B: It is {rooms} with a small kitchen.", "A: Sounds nice."),
        ),
        _step(
            ("A: How much is the rent?", "B: It is {rent} a month."),
            ("B: The rent is {rent} a month, water included.", "A: That is within my budget."),
        ),
        _step(
            ("A: When can I move in?", "B: From the start of {month}."),
            ("B: You can move in at the start of {month}.", "A: That works for me."),
            optional=True,
        ),
        _step(
            ("A: I have {pet}. Is that OK?", "B: Yes, pets are fine."),
            ("B: Do you have any pets?", "A: Just {pet}.", "B: That is no problem."),
            optional=True,
        ),
        _step(
            ("A: I will take it.", "B: Great, I will bring the contract."),
            ("A: I like it. Can I sign today?", "B: Sure."),
            movable=False,
        ),
    ),
    closings=(
        ("B: See you soon, then.",),
        ("A: Thank you for showing me around.", "B: My pleasure."),
    ),
    summaries=(
        "{A} rents {rooms} {area} for {rent} a month and will move in at the start of {month}.",
        "{B} shows {A} {rooms} {area}. {A} decides to take it for {rent} a month.",
        "{A} wants {rooms} {area}, which costs {rent} a month, and can keep {pet} there.",
        "{A} agrees to rent the flat {area} from {month} for {rent} a month.",
    ),
    details=(
        ("A: Is it quiet at night?", "B: Yes, very quiet."),
        ("A: Is there a lift?", "B: No, but it is only on the second floor."),
        ("B: The shops are just around the corner.", "A: That is handy."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("A: Is {rooms} {area} still free?", "B: Yes, it is {rent} a month.", "A: Good, I will take it."),
    ),
)

TECH_SUPPORT = Domain(
    topic="tech support",
    slots={
        "a_name": NAMES,
        "b_name": NAMES,
        "device": ("laptop", "printer", "phone", "tablet", "router", "computer"),
        "problem": ("will not turn on", "keeps turning off", "is very slow", "keeps making a strange noise",
                    "shows an error message"),
        "since": DAYS,
        "fix": ("restart it", "update the software", "charge the battery", "check the cable", "reset it"),
        "ticket": ("4521", "3870", "6194", "2735", "5018"),
        "day": DAYS,
        "outcome": (
            {"outcome_a": "OK. Oh, it works again!", "outcome_b": "Great, glad I could help.",
             "outcome_s": "the {device} works again"},
            {"outcome_a": "I did, but nothing changed.", "outcome_b": "Then please bring it to our shop on {day}.",
             "outcome_s": "{A} will bring it to the shop on {day}"},
            {"outcome_a": "Done. It looks fine now.", "outcome_b": "Good. Call us if it happens again.",
             "outcome_s": "that fixes the problem"},
        ),
    },
    openings=(
        ("B: Tech support, this is {b_name}. How can I help?", "A: Hi, my {device} {problem}."),
        ("A: Hello, I have a problem with my {device}.", "B: What is the problem?", "A: It {problem}."),
        ("B: Hello, you are through to tech support.", "A: Hi, my name is {a_name}. My {device} {problem}."),
    ),
    steps=(
        _step(
            ("B: When did it start?", "A: On {since}."),
            ("A: It has been like this since {since}.", "B: I see."),
            optional=True,
        ),
        _step(
            ("B: Your ticket number is {ticket}.", "A: Let me write that down."),
            ("B: Can I have your ticket number?", "A: Yes, it is {ticket}."),
            optional=True,
        ),
        _step(
            ("B: Please {fix}.", "A: {outcome_a}", "B: {outcome_b}"),
            ("B: First, try to {fix}.", "A: {outcome_a}", "B: {outcome_b}"),
            ("B: Could you {fix} for me?", "A: {outcome_a}", "B: {outcome_b}"),
            movable=False,
        ),
    ),
    closings=(
        ("A: Thank you for your help.", "B: You are welcome."),
        ("A: Thanks, bye.",),
    ),
    summaries=(
        "{A}'s {device} {problem}. {B} tells {A} to {fix}, and {outcome_s}.",
        "{A} calls for help because the {device} {problem}. {B} asks {A} to {fix}, and {outcome_s}.",
        "{B} helps {A} with a {device} that {problem}. The ticket number is {ticket}.",
        "{A} has a problem with the {device}: it {problem}. {B} asks {A} to {fix}.",
    ),
    details=(
        ("B: Is it still under warranty?", "A: Yes, I bought it last year."),
        ("B: Did you drop it?", "A: No, never."),
        ("B: Which model is it?", "A: I am not sure. It is quite old."),
    ),
    small_talk=SERVICE_SMALL_TALK,
)

OPEN_AN_ACCOUNT = Domain(
    topic="open an account",
    slots={
        "a_name": NAMES,
        "account": ("a savings account", "a checking account", "a student account"),
        "deposit": ("$50", "$100", "$200", "$500"),
        # The customer says "my passport"; the summary says "a passport".
        "id_doc": (
            {"id_doc": "my passport", "id_doc_s": "a passport"},
            {"id_doc": "my driving licence", "id_doc_s": "a driving licence"},
            {"id_doc": "my student card", "id_doc_s": "a student card"},
        ),
        "card_days": ("five days", "a week", "ten days"),
    },
    openings=(
        ("B: Good morning. What can I do for you?", "A: I would like to open {account}."),
        ("A: Hi, I want to open {account} here.", "B: Sure, please take a seat."),
    ),
    steps=(
        _step(
            ("B: Do you have any ID with you?", "A: Yes, here is {id_doc}."),
            ("A: I brought {id_doc}. Is that enough?", "B: Yes, that is fine."),
        ),
        _step(
            ("B: How much would you like to put in today?", "A: {deposit}, please."),
            ("A: I want to put in {deposit} today.", "B: No problem."),
        ),
        _step(
            ("A: When will I get my bank card?", "B: In about {card_days}."),
            ("B: Your card will arrive in {card_days}.", "A: Great."),
            optional=True,
        ),
        _step(
            ("B: Can I have your full name?", "A: {a_name} Miller."),
            ("A: My name is {a_name}, by the way.", "B: Nice to meet you, {a_name}."),
            optional=True,
        ),
    ),
    closings=(
        ("B: Your account is ready.", "A: Thanks for your help."),
        ("A: Thank you. Goodbye.",),
    ),
    summaries=(
        "{A} opens {account} with {deposit} and will get a card in {card_days}.",
        "{B} helps {A} open {account}. {A} shows {id_doc_s} and puts in {deposit}.",
        "{A} opens {account} using {id_doc_s}, and the card will arrive in {card_days}.",
        "{A} puts {deposit} into a new account after showing {id_doc_s} to {B}.",
    ),
    details=(
        ("B: Please fill in this form.", "A: OK. Here you are."),
        ("A: Is there a monthly fee?", "B: No, it is free."),
        ("A: Can I use the app too?", "B: Yes, you can use it from today."),
    ),
    small_talk=SERVICE_SMALL_TALK,
    quick=(
        ("A: I want to open {account}. Here is {id_doc}.", "B: Thank you. How much will you put in?",
         "A: {deposit}."),
    ),
)

ASK_ABOUT_A_TEST = Domain(
    topic="ask about a test",
    slots={
        "a_name": NAMES,
        "b_name": ("Mr. Smith", "Ms. Brown", "Mrs. Wang", "Mr. Miller"),
        "subject": ("math", "history", "biology", "English", "chemistry", "geography"),
        "day": DAYS,
        "chapters": ("chapters one to three", "chapters four and five", "chapter six", "the first two chapters"),
        "room": ("room 12", "room 204", "the main hall", "the library"),
        "tip": ("go over the homework", "read the notes again", "do the practice questions"),
    },
    openings=(
        ("A: Excuse me, {b_name}, can I ask you about the {subject} test?", "B: Of course."),
        ("B: Hello, {a_name}. Do you have a question?", "A: Yes, it is about the {subject} test."),
        ("A: {b_name}, do you have a minute? I am worried about the {subject} test.", "B: Sure, what is it?"),
    ),
    steps=(
        _step(
            ("A: When is it?", "B: It is on {day} morning."),
            ("A: Is the test on {day}?", "B: Yes, it is."),
        ),
        _step(
            ("A: What will it cover?", "B: It covers {chapters}."),
            ("B: Please study {chapters}.", "A: OK, I will."),
        ),
        _step(
            ("A: Where will it be?", "B: In {room}."),
            ("B: It will be held in {room}.", "A: Got it."),
            optional=True,
        ),
        _step(
            ("A: How should I prepare?", "B: I suggest you {tip}."),
            ("B: It would help to {tip}.", "A: Thanks, that is a good idea."),
            optional=True,
        ),
    ),
    closings=(
        ("A: Thank you so much.", "B: Good luck."),
        ("B: See you in class.",),
    ),
    summaries=(
        "{A} asks {B} about the {subject} test, which is on {day} in {room}.",
        "The {subject} test is on {day} and covers {chapters}. {B} tells {A} to {tip}.",
        "{B} tells {A} that the {subject} test covers {chapters} and will be held in {room}.",
        "{A} learns that the {subject} test on {day} will cover {chapters}.",
    ),
    details=(
        ("A: Can we use a calculator?", "B: No, not this time."),
        ("A: How long is the test?", "B: One hour."),
        ("B: Did you finish the homework?", "A: Almost."),
    ),
    small_talk=COMMON_SMALL_TALK,
)

WEEKEND_PLAN = Domain(
    topic="weekend plan",
    slots={
        "a_name": NAMES,
        "b_name": NAMES,
        "day": ("Saturday", "Sunday"),
        "activity": ("go hiking", "see a movie", "go swimming", "play tennis", "visit the museum", "have a picnic"),
        # Turned down first, so the summary must keep the plan finally agreed.
        "first_activity": ("go hiking", "see a movie", "go swimming", "play tennis", "visit the museum",
                           "have a picnic"),
        "time": ("10:00", "11:30", "1:00", "2:30", "4:00"),
        "place": ("the station", "the park gate", "the bus stop", "the coffee shop", "the library"),
    },
    openings=(
        ("A: Hi {b_name}, are you free this {day}?", "B: I think so. Why?"),
        ("B: Hey {a_name}, any plans for {day}?", "A: Not yet."),
        ("A: {b_name}, what are you doing on {day}?", "B: Nothing much."),
    ),
    steps=(
        _step(
            ("A: Do you want to {first_activity}?", "B: Not really. How about we {activity} instead?",
             "A: Good idea."),
            ("A: Let's {activity}.", "B: Sounds great!"),
            ("B: Shall we {activity}?", "A: Sure, I would love to."),
            movable=False,
        ),
        _step(
            ("B: What time?", "A: How about {time}?", "B: Fine."),
            ("A: Let's meet at {time}.", "B: OK."),
        ),
        _step(
            ("A: Where should we meet?", "B: At {place}."),
            ("B: Let's meet at {place}.", "A: Sounds good."),
            optional=True,
        ),
    ),
    closings=(
        ("A: See you then.", "B: See you."),
        ("B: Great, I cannot wait.",),
    ),
    summaries=(
        "{A} and {B} will {activity} on {day}. They will meet at {place} at {time}.",
        "{A} and {B} agree to {activity} on {day} and meet at {time}.",
        "{A} and {B} plan to {activity} this {day} and meet at {place}.",
        "{B} will {activity} with {A} on {day} at {time}.",
        "{A} and {B} decide to {activity} rather than {first_activity} on {day}.",
    ),
    details=(
        ("B: Should I bring anything?", "A: Just some water."),
        ("A: I hope it does not rain.", "B: The weather report says it will be sunny."),
        ("B: Can my brother come too?", "A: Of course, the more the better."),
    ),
    small_talk=FRIENDS_SMALL_TALK,
)

LOST_AND_FOUND = Domain(
    topic="lost and found",
    slots={
        "a_name": NAMES,
        "item": ("wallet", "bag", "phone", "set of keys", "scarf", "hat"),
        "color": ("black", "red", "brown", "blue", "green", "grey"),
        "place": ("on the bus", "on the train", "in the cafe", "in the library", "at the gym"),
        "day": DAYS,
        "time": ("5:00", "6:00", "7:30"),
        "phone_no": ("555 0192", "555 3841", "555 7720"),
        "found": (
            {"found": "We have a {color} {item} here. Is this yours?",
             "found_reply": "Yes, that is mine! Thank you so much.",
             "found_s": "gets it back"},
            {"found": "Someone brought in a {color} {item} this morning. You can pick it up before {time}.",
             "found_reply": "Great, I will come right away.", "found_s": "can pick it up before {time}"},
            {"found": "Nobody has brought it in yet, but I will call you if we find it.",
             "found_reply": "Thank you. My number is {phone_no}.", "found_s": "will get a call if it is found"},
        ),
    },
    openings=(
        ("A: Hello, I think I left my {item} {place}.", "B: When was that?", "A: On {day}."),
        ("B: Lost and found office. Can I help you?", "A: Yes, I lost my {item} {place} on {day}."),
    ),
    steps=(
        _step(
            ("B: What color is it?", "A: It is {color}."),
            ("A: It is a {color} {item}.", "B: Let me look."),
            movable=False,
        ),
        _step(
            ("B: Can I have your name?", "A: {a_name} Brown."),
            ("A: My name is {a_name}, if that helps.", "B: Thank you, {a_name}."),
            optional=True,
        ),
        _step(
            ("B: {found}", "A: {found_reply}"),
            movable=False,
        ),
    ),
    closings=(
        ("B: Have a nice day.",),
        ("A: Thanks again.", "B: You are welcome."),
    ),
    summaries=(
        "{A} lost a {color} {item} {place} on {day} and {found_s}.",
        "{A} asks {B} about a {item} lost {place}. {A} {found_s}.",
        "{A} reports a lost {color} {item} to {B} and {found_s}.",
        "{A} left a {item} {place} on {day} and {found_s}.",
    ),
    details=(
        ("B: Is there anything inside it?", "A: Just a few small things."),
        ("B: Which seat were you in?", "A: I do not remember."),
        ("A: Do people often lose things here?", "B: Every day."),
    ),
    small_talk=SERVICE_SMALL_TALK,
)

DOMAINS: tuple[Domain, ...] = (
    BOOK_A_TABLE, SEE_A_DOCTOR, RETURN_GOODS, BOOK_A_FLIGHT, BOOK_A_ROOM, JOB_INTERVIEW,
    RENT_A_FLAT, TECH_SUPPORT, OPEN_AN_ACCOUNT, ASK_ABOUT_A_TEST, WEEKEND_PLAN, LOST_AND_FOUND,
)
TOPICS: tuple[str, ...] = tuple(domain.topic for domain in DOMAINS)


# --- Generation ---------------------------------------------------------------------------------


def generate_splits(size: int = 2000, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Rows {"id", "dialogue", "summary", "topic"} in splits "train", "validation", "test" (80/10/10 of size, each at least 10)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    rng = random.Random(seed)
    # Dialogues are unique across all splits, so no test dialogue is also a training dialogue.
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, count in zip(SPLIT_NAMES, _split_sizes(size)):
        domains = _balanced_domains(rng, count)
        splits[split] = [_make_row(rng, domain, f"builtin_{split}_{i}", seen) for i, domain in enumerate(domains)]
    return splits


def corpus_texts(splits: dict[str, list[dict[str, str]]]) -> Iterator[str]:
    """Every dialogue and summary text, for training the tiny tokenizer."""
    for rows in splits.values():
        for row in rows:
            yield row["dialogue"]
            yield row["summary"]


def _split_sizes(size: int) -> tuple[int, int, int]:
    held_out = max(MIN_SPLIT_SIZE, round(size * 0.1))
    return max(MIN_SPLIT_SIZE, size - 2 * held_out), held_out, held_out


def _balanced_domains(rng: random.Random, count: int) -> list[Domain]:
    """Every domain equally often (give or take one), in random order, so small splits cover them all."""
    offset = rng.randrange(len(DOMAINS))
    domains = [DOMAINS[(offset + i) % len(DOMAINS)] for i in range(count)]
    rng.shuffle(domains)
    return domains


def _make_row(rng: random.Random, domain: Domain, row_id: str, seen: set[str]) -> dict[str, str]:
    for _ in range(MAX_ATTEMPTS):
        values, groups = _sample_slots(rng, domain.slots)
        turns = _merge_turns(_conversation(rng, domain))
        if not MIN_TURNS <= len(turns) <= MAX_TURNS:
            continue
        first_role = turns[0][0]
        dialogue, mentioned = _render_dialogue(turns, first_role, values)
        # A group is mentioned as a whole: the dialogue says "a refund" and the summary "gets a refund".
        for group in groups:
            if mentioned.intersection(group):
                mentioned.update(group)
        if not MIN_DIALOGUE_WORDS <= len(dialogue.split()) <= MAX_DIALOGUE_WORDS or dialogue in seen:
            continue
        summary = _render_summary(rng, domain, values, mentioned, first_role, dialogue)
        if summary is None or not MIN_SUMMARY_WORDS <= len(summary.split()) <= MAX_SUMMARY_WORDS:
            continue
        seen.add(dialogue)
        return {"id": row_id, "dialogue": dialogue, "summary": summary, "topic": domain.topic}
    raise RuntimeError(f"could not write a valid dialogue for {domain.topic!r}; the templates need fixing")


def _sample_slots(rng: random.Random, slots: Mapping[str, Pool]) -> tuple[dict[str, str], list[tuple[str, ...]]]:
    """One value per slot, and the names of each group of values chosen together.

    Plain values are all different, so that e.g. the rejected time is never the agreed one.
    """
    values: dict[str, str] = {}
    groups: list[tuple[str, ...]] = []
    for name, pool in slots.items():
        taken = list(values.values())
        options = [option for option in pool if isinstance(option, dict) or option not in taken]
        choice = rng.choice(options)
        if isinstance(choice, dict):
            values.update(choice)
            groups.append(tuple(choice))
        else:
            values[name] = choice
    return values, groups


def _conversation(rng: random.Random, domain: Domain) -> list[str]:
    """Role-tagged turn templates: the informative exchanges with filler exchanges mixed in."""
    if domain.quick and rng.random() < QUICK_SHARE:
        core = [rng.choice(domain.quick)]
    else:
        steps = [step for step in domain.steps if not step.optional or rng.random() < OPTIONAL_STEP_SHARE]
        core = [rng.choice(domain.openings), *(rng.choice(step.variants) for step in _shuffle_movable(rng, steps))]
    fillers = rng.sample(domain.details, rng.choice((0, 0, 1, 1, 2)))
    fillers += rng.sample(domain.small_talk, rng.choice((0, 0, 1)))
    for filler in fillers:
        # After the opening, since a conversation starts with a greeting or the request, and before
        # the last step, which usually settles the outcome.
        core.insert(rng.randint(1, max(1, len(core) - 1)), filler)
    core.append(rng.choice(domain.closings))
    return [turn for block in core for turn in block]


def _shuffle_movable(rng: random.Random, steps: Sequence[Step]) -> list[Step]:
    movable = [step for step in steps if step.movable]
    rng.shuffle(movable)
    reordered = iter(movable)
    return [next(reordered) if step.movable else step for step in steps]


def _merge_turns(templates: Sequence[str]) -> list[tuple[str, str]]:
    """(role, text) turns, with back-to-back templates of one role joined so speakers alternate."""
    turns: list[tuple[str, str]] = []
    for template in templates:
        role, text = template.split(": ", 1)
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]} {text}")
        else:
            turns.append((role, text))
    return turns


def _render_dialogue(
    turns: Sequence[tuple[str, str]], first_role: str, values: Mapping[str, str]
) -> tuple[str, set[str]]:
    """The dialogue text and the names of the slots it mentions."""
    mentioned: set[str] = set()
    lines = []
    for role, template in turns:
        text, used = _fill(template, values)
        mentioned |= used
        lines.append(f"{_person_tag(role, first_role)}: {text}")
    return "\n".join(lines), mentioned


def _render_summary(
    rng: random.Random,
    domain: Domain,
    values: Mapping[str, str],
    mentioned: set[str],
    first_role: str,
    dialogue: str,
) -> str | None:
    """A random summary template among those whose every slot the dialogue mentioned."""
    usable = [template for template in domain.summaries if _slots_needed(template, values) <= mentioned]
    if not usable:
        return None
    template = rng.choice(usable)
    refs = {role: _speaker_ref(rng, role, first_role, values, dialogue) for role in ("A", "B")}
    summary, _ = _fill(template, {**values, **refs})
    return summary[0].upper() + summary[1:]


def _slots_needed(template: str, values: Mapping[str, str]) -> set[str]:
    """Slots a template uses, including those inside the values it uses (an outcome naming a day)."""
    needed: set[str] = set()
    pending = [template]
    while pending:
        for name in _placeholders(pending.pop()):
            if name in ("A", "B") or name in needed:
                continue
            needed.add(name)
            pending.append(values[name])
    return needed


def _speaker_ref(rng: random.Random, role: str, first_role: str, values: Mapping[str, str], dialogue: str) -> str:
    """How a summary names a role: by its #PersonN# tag, or by the name the dialogue gave it."""
    name = values.get(f"{role.lower()}_name")
    if name and re.search(rf"\b{re.escape(name)}\b", dialogue) and rng.random() < NAME_IN_SUMMARY_SHARE:
        return name
    return _person_tag(role, first_role)


def _person_tag(role: str, first_role: str) -> str:
    return "#Person1#" if role == first_role else "#Person2#"


def _fill(template: str, values: Mapping[str, str]) -> tuple[str, set[str]]:
    """The template with its slots filled, and the slot names used (values may hold slots too)."""
    used: set[str] = set()
    text = template
    # Two rounds cover a value that holds slots; none holds a value that holds slots.
    for _ in range(2):
        names = _placeholders(text)
        if not names:
            break
        used |= names
        text = text.format_map(values)
    return text, used


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}
