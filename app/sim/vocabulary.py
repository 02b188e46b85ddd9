"""The fixed word list the simulator draws its answers from.

Plain, short English words keep the output readable in logs and UIs, and a fixed list (never
reordered) keeps answers stable across versions: changing it changes every simulated answer.
"""

from __future__ import annotations

_WORD_TEXT = """
able about above across act add after again against age ago air all almost alone along
already also always among amount and animal answer any apple area arm around art ask away
baby back bad bag ball bank base be bear beat beauty bed before begin behind bell best better
between big bird black blue boat body bone book both box boy bread break bright bring brother
brown build burn busy but buy call calm can car card care carry case cat catch cause cell
center chair chance change check child city class clean clear climb clock close cloud coast
cold color come common cook cool copy corner could count country course cover cross crowd cup
dark day deep door down draw dream dress drink drive dry during each early earth east easy eat
edge egg end enough even evening event every eye face fact fair fall family far farm fast
father field fill find fine fire first fish five floor flower fly follow food foot forest
form four free fresh friend front fruit full game garden gate gentle gift give glass gold good
grass great green ground group grow half hand happy hard hat have head hear heart heavy help
here high hill hold home hope horse hot hour house idea island join just keep key kind king
know lake land large last late laugh lead learn leave left letter level light line list
little live long look love low machine make many map mark market matter may measure meet
middle might mile milk mind minute moment money month moon more morning mother mountain move
much music must name near need never new next night north note number ocean offer often old
open order other over page paper part party pass path pay people piece place plain plan plant
play point poor quick quiet rain raise reach read ready real red remember rest rich ride right
ring river road rock room round rule run safe sail salt same sand save say school sea season
seat second see seed send set shape share ship shore short show side sign simple sing sister
sit size sky sleep slow small smile snow soft soil some song soon sound south space speak
spring square stand star start state station stay step still stone store story street strong
study summer sun sure table tail take talk tall teach team tell ten test thank then thing
think three through time today together tomorrow tool top touch tower town track trade train
travel tree true turn under until up use valley very view village visit voice wait walk wall
warm watch water wave way weather week well west wheel white whole wide wild wind window
winter wise wonder wood word work world write year yellow young
"""

WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
