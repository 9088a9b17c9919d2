"""Real words the KGFact name generator could produce, so it can reject them.

Every lower-case alphabetic entry (4-10 letters) of the SmolLM2-135M tokenizer vocabulary (Apache-2.0) that
the generator's syllable pattern can spell: a common word or word piece is a single token, so this list covers
the words a model already knows ("mode", "node", "baker"). Generated once and frozen here, so the world does not
depend on any tokenizer at run time.
"""

_WORDS = """
bage bake baker bali banana bananas band bane bara bare barn baron baroque basal base basel baseline
basemodel basename bases basil basin basis bates bath bathe bedo before began begin begun belarus belize
bend bene benevol benin bere bern beside besides bestos beta beth bever beverage beverages biden bike bikes
bilateral bile bind bipolar bison bite bites bola bond bone bones bonus bonuses bore boredom boris born boro
boron boston botan both bother boto bound bour bovine brake brakes bral bram bran brand brane bras brate
brates brave brazil bren breton bride brigade brim brine bris bristol broke broken broker brom bron broth
brother brun bruno brushes brutal brute bund burn buses bushel bushes dakota dala dale damage damages dame
dana danube dare data database databases datas date dates datetime dave davis debate debates debor debris
dedu defe defend defer defin define defines definite definitive degrade dele delegate delegates delete deli
deliber deliberate delim delimiter deline deliver demand demise demo demol demon dend denis denom denote
denotes depend depos dera dere derivative derive derives desire desires destabil deter deton detox developer
devil devise devon devote digestive digital dilem dilute dimin diminishes dinand dipole dire disaster dise
dishes dishon distal dive diver dives divide dividend divides divine divisive divor dome domes domin dominal
dominate dominates donate done donor dopamine dosage dosages dose doses dove dover dozen dragon drake dram
drama dramas dres drive driven driver drives drone drones drove drum duke dule dund dunes fabulous fade fake
fame famine famous fare faster fatal fate fateful father favor favorite favorites favour favourite federal
feline felix female females femin feminine femoral femur fend feral feres fern festival festive fetal fetus
fever fiber fibre fibres fibro fibrosis fibrous figur figurative figure figures figurines file filename
filenames filepath files filipino filipinos final find fine finer fines finishes finite fire firefox fires
fisher fishes five folate fond forage fore foreground fores forever forum foster foul found four fukushima
fumes fund funeral furn fuse fuselage fuses futile future futures gaba gael gage galapagos galax gale galile
game games gand ganes gano garage garn gases gasoline gate gates gather gathere gave gaza gaze gebra gelatin
gemini gemon gene gener genera general generalize generate generates generative generator generous genes
genesis geneva genital genome genomes genu genus gesture gestures getitem gira give given gives giza gond
gone gore gour gover govern grade grader grades gradu gram gran grand granite granul granular granules grape
grapes gras grate grateful gratitude grave gravel graves graze gren gres grim grind grou ground grouse grove
groves guru kabul kale kali kand kane karen karn kate kath katherine katrina keith kend kerala keras keratin
kerel kerosene keto kevin kiki kilogram kilometer kilometres kinase kind kines kinesis kite kore kosher
kosovo krak kumar label labor labou labour labrador laden lades lake lakes lakota lama lamin land lane lanes
lapar laser late later lateral latex latin latino latinos latitude latitudes lava lazarus leban lebanese
lebanon legal legato lege legend leges legis legitim legitimate lego legumes leiden lein leisure lemon
lemonade lename lend lene lenin letal lete letes leth lethal leton leve level leveland lever leverage levi
levin levine liberal liberate life lifes lifetime lifetimes ligand like likes lima lime limestone lind line
linen liner lines linux liquor lisa lisher lishes listen listener lite liter literal literate literature
lith litres live liver lives lobe lobes logan logarith login logo logos lone lore loren lose loses lotus
louder love lover loves lugin luke lumin luminous luna lunar lund lupus lure lute lutein luther lutheran
madame made madison magazine magazines make maker makes mala male males mali mama manage manager manages
mand manila manipulate manitoba manor manure marathon mare mares mari marin marine marines marital maritime
mason master mate mater mates math matrix mature matures maze medal medi medina meditate meditative mega
megal melan melanin melanoma melatonin melon memes memo memor memorize mend mene menu menus mere mese
mesopotam meta metabol metadata metal metastasis metavar mete meter meth methane methanol metre metres metro
metropolis midi migrate mike milan mile miles milestone milestones militar mind mine miner mineral mines
mini minim minimal minimax minimise minimize minimizes minimum minister minor minus minute minutes mira
mistake mistaken mistakes misuse mite mites mith mitigate mobil mobile mobilize modal mode model modem
moderate moderator modern modes modular modulate module modules modulus molar mole moles monaster mond
monitor mono monopol monothe moral morale more morn moses moshe moth mother motivate motivates motive
motives motor mound mour mourn mouse mouth move moves mule mund mural musa muse mutate nadu nagasaki name
names namese nano nanom nanotubes napole nasa nasal natal nathan native natives nato natural nature naval
nave navigate nazareth nazi nazis nebul nebula negative negatives negro neil neither nematode nematodes
nepal netes nether nevada never niger nike nile nina nine nino nitrate nitrates nitrite nitrogen nitrous
nobel node nodes nodules nominal nond none nonex nose noses nosis note notes notre noun nour nova novel novo
numer numerator numerous nure nutri pagan page pages pakistan pakistani palae palate pale palestine panama
pand pane panel panor papal paper para parade parades paradise paradox paragu paragus param parameter paran
paras parasite parasites pare paren paris parishes pasadena paso pasta paste pastime pastor pastoral pasture
pastures patagon patel path pathogen patri patrol patron patronage pave paves pedal pedro penal pend
penetrate penis perate perature pere peri peril perilous perimeter peror peru pete peter petrol pige pike
pilate pile piles pine pines pipe pipeline pipelines pipes pirate pirates pistol piston pite pitu pivotal
poke poker poland polar pole poles polite polo pomegran pond pone pope popen popul popular populate populous
pora poral pore pores porn porous posal pose poses posite positive positives postage postal poster posture
postures posure potato pound pour pulumi punitive pupil pure puritan pushes putative putin quadru quake
quaker quakes qual quar quas quasi quate quer ques quil quin quir quire quis quisite quite quota quotas
quote quotes rada radar rade rades radi radon rador rael rage ragon rake rama ramadan raman rame rames rand
rano rape rare rarer rase rases rashes rason rasound raster rate rates rath rather rative rator ravel raven
razor rebel rebound rede redefine redes redis redox redu redund refer refere referen referend refin refine
refuge refund refusal refuse refuses refute regate regen regener regenerate regex regim regime regimen
regimes register regon regul regular regulate regulates regulator reim rein reiter relate relates relative
relatives relax rele reli relu reme remedi remem remind reminis remote removal remove removes remun renal
rename rend rene repatri repe repel reper repetitive repo reponame repos repur require requires requisite
resa rese reshape reside resides resin resistor resize resol reson resonate resonates restore resume resumes
resur retal reth retin retina retinal retire retro retros return reve revel reven rever revere reverend
revis revise revital revival revive revol ribe riber ribes ribute ributes ride rider rides ridor rigor
rigorous rika riminal rina rine rinos ripe ripen rise risen rises rison rite rites ritis rival river rivera
rize rizes rizona robe rober robes robin rode rodite rodu rofen rogen roger rogram roke rokes roland role
roles roma roman rome romes rometer rone rones rope ropes ropol ropolis ropolitan rosa rose rosen roses
rosine rosis rosive rotate rotates rote roth rotor rouge round rous rouse route router routes routine
routines rove rover roves roviral rude rugu rule ruler rules rund rupulous rural rusive ruth sabotage safari
safe safegu safer saga sage sages sake salam sale salem sales saline saliva salon samar same sami sand
sanitizer sara saras satan satire satis saturn savage save saves sein seize seizure seizures sema semen
semester semi semin seminal seminar senate senator send senegal separ separate separates separator sequel
seren serene serotonin serum sesame seth seven sever several severe shade shades shak shake shaken shale
sham shaman shame shan shape shapes shar share shares sharon shel shen sher shim shin shine shines shir
shire shiva shone shor shore shoreline shores shovel shutil side sides similar simon simulate simulator sind
sine sinister sinus sinuses sinusitis sire siri sister site sites situ size sizes sober soda sodas sofar
solar sole soles solete solitude solo solomon somali some sometime sometimes sonar sore sores soul sound
sour south southern souven sovere stabil stabilize stage stages stake stakes stal stalin stam stamina stan
stand star stare state states stature status statute statutes stefan stein steine steiner stem sten stenosis
ster stere steril sterile stern steve steven stim stimul stimulate stimulates stimuli stimulus stir stole
stolen stom ston stone stones stor storage store stores stove stoves sudan sudo sufi sugar sumatra sund
super sure surn susan sushi tage take taken takes tale tales taliban tame tamil tape taper tapes tara taste
tastes tate tavern tein tele telome telomeres tend tenure tera teresa tern terol tester testes testim
tetanus tetra thal thames than thebes their thel them theme themes then ther thera there therefore therein
these theses thesis theta thin thir this thom thomas thon thor thora thorn those thou thous thousand thouse
thur thus tiber tibetan tidal tide tides tiger tile tiles time timeline timelines timer times timezone timor
tire tires titan titus todo tofu together token tokenizer tole toledo toler tolerate tomato tonal tone tones
torn total tour trade tradem trader trades tram tran travel traveler trek trem tremend tremor trend tribal
tribe tribes tribunal tribune tribute trigon tril trim trimes trimester trin trol tropes trou trove truman
truth tube tuber tubes tubular tudor tumor tumour tuna tune tunes tunis turn tutor vagina vaginal vagu
validate validator valor valu vana vand vapor vapour vara vari vase vedas vegan vegas vegetative veil vein
vend vene venile veniles venom venomous venous venus vera verage verages vere vern vester vestibular veston
veter veteran veterin veto vibrate vide vigil vigor vigorous vind vine vinegar vines viral viron virus
viruses visa visas visitor visor vista vital vitamin vitro vivo volatile volume volumes vote voter votes
vous zebra zema zero zeros zika zone zones zoro
"""
COMMON_WORDS = frozenset(_WORDS.split())
